"""Names that cross a process boundary (ground floor: imports nothing of the package).

A campaign command (``ablate``, ``tune``) starts ``fit`` processes and reads what they leave;
both sides take these names from here, never as retyped literals.
"""

from __future__ import annotations

# Environment variables a launcher sets for the fit it starts.
LAUNCHER_ENV = "SWIN_LIGHTNING_LAUNCHER"  # "local" or "slurm": a run of ablate/tune
TRIAL_ENV = "SWIN_LIGHTNING_TRIAL"  # a trial of tune (encoding: runs/pruning.py)
# The run lock's own variable, LOCK_ENV, is defined beside RunLock in storage.py, the ground
# floor that both sides of the lock import.

# Files in a run folder.
CHECKPOINTS = "checkpoints"  # the folder of a run's checkpoints
LAST_CKPT = "last.ckpt"  # the newest checkpoint, what a resume reads
FINISHED = "finished.json"  # written when a run of a campaign has finished, with its fingerprint
PRUNED = "pruned.json"  # written into the run folder when tune's pruner stops the trial
SETTINGS = "settings.yaml"  # the resolved settings of a <variant>/<settings> folder
RUN_RECORD = "run.json"  # a run's attempts (runs/store.py)
JOB_RECORD = "job.json"  # a run's SLURM job (runs/store.py)

# Exit codes of a fit stopped by a signal after saving its checkpoint (128 + the signal, as a
# shell reports them).
SIGTERM_EXIT_CODE = 143
SIGINT_EXIT_CODE = 130
