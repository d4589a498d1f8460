"""An experiment's runs and their state, read from the run folders alone.

The experiment folder holds ``experiment.json`` (the runs of the last launch: variant, seed,
settings fingerprint, folder) and one folder per run,
``<variant>/<fingerprint>/seed_<n>/``, holding what every launcher writes there:

- ``.lock``: held while a process trains the run (:class:`~swin_lightning.storage.RunLock`);
- ``run.json``: the latest attempt (state, attempts, job id, host, exit code, log, message);
- ``job.json``: the SLURM job that will run it (job id, stdout and stderr), from submission;
- ``finished.json``: written once the run has finished, with its fingerprint.

:func:`read_status` turns these (and, for a submitted run, what ``scontrol`` says of its
job) into one of :data:`STATES`, so ``ablate``, ``ablate status`` and ``ablate report``
agree whichever launcher ran the run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from swin_lightning.events import DamagedRunError, read_scalars, scalar_values
from swin_lightning.protocol import FINISHED, JOB_RECORD, PRUNED, RUN_RECORD
from swin_lightning.storage import RunLock, write_text

MANIFEST = "experiment.json"
STATES = ("pending", "running", "finished", "failed", "interrupted")
# SLURM job states in which the job will still run (or runs): the run is not over.
SLURM_ACTIVE = {
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
    "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "PREEMPTED",
}  # fmt: skip


def fingerprint(settings: dict[str, Any]) -> str:
    """A short hash of resolved settings (canonical JSON)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def read_json(path: Path) -> dict[str, Any]:
    """A JSON record, or {} when it is missing or unreadable (a record is rewritten whole)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def update_json(path: Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into a JSON record (written atomically); returns the new record."""
    record = {**read_json(path), **fields}
    write_text(path, json.dumps(record, indent=1, default=str))
    return record


@dataclass
class Run:
    """One variant x seed: its settings (as ``fit`` arguments) and its folder."""

    variant: str
    seed: int
    fingerprint: str
    dir: Path
    args: list[str] = field(default_factory=list)  # fit arguments but seed and logger
    items: list[str] = field(default_factory=list)  # the variant's overlays and overrides
    accelerator: str = "auto"

    @property
    def record(self) -> dict[str, Any]:
        return read_json(self.dir / RUN_RECORD)

    def update(self, **fields: Any) -> dict[str, Any]:
        return update_json(self.dir / RUN_RECORD, **fields)

    @property
    def finished(self) -> bool:
        return read_json(self.dir / FINISHED).get("fingerprint") == self.fingerprint

    @property
    def pruned(self) -> dict[str, Any]:
        """What tune's pruner left when it stopped this trial (``pruned.json``); {} if not."""
        return read_json(self.dir / PRUNED)

    @property
    def job(self) -> dict[str, Any]:
        """The run's SLURM job (``job.json``: id, log paths, submission time); {} if none."""
        return read_json(self.dir / JOB_RECORD)

    def update_job(self, **fields: Any) -> dict[str, Any]:
        return update_json(self.dir / JOB_RECORD, **fields)

    def attempt_started(self, launcher: str, **fields: Any) -> dict[str, Any]:
        """Record that an attempt starts now (on this host); returns the record."""
        record = self.record
        return self.update(
            state="running", attempts=int(record.get("attempts", 0)) + 1, launcher=launcher,
            host=socket.gethostname(), started=time.time(), ended=None, exit_code=None,
            message="", seconds=float(record.get("seconds") or 0), **fields,
        )  # fmt: skip

    def attempt_ended(self, state: str, exit_code: int | None, message: str = "") -> None:
        """Record how an attempt ended; its time adds to the run's elapsed seconds."""
        record = self.record
        spent = time.time() - record["started"] if record.get("started") else 0.0
        self.update(state=state, exit_code=exit_code, message=message, ended=time.time(),
                    seconds=round(float(record.get("seconds") or 0) + spent, 1))  # fmt: skip

    def mark_finished(self, seconds: float, resumed: bool) -> None:
        """The run has finished: ``finished.json`` (its fingerprint: a later run with other
        settings is not taken for it) and the attempt's end."""
        record = {"seconds": round(seconds, 1), "resumed": resumed,
                  "fingerprint": self.fingerprint, "seed": self.seed}  # fmt: skip
        write_text(self.dir / FINISHED, json.dumps(record))
        self.attempt_ended("finished", 0)

    def to_dict(self, exp_dir: Path) -> dict[str, Any]:
        out = asdict(self)
        out["dir"] = str(self.dir.relative_to(exp_dir))
        return out


@dataclass
class Experiment:
    """The runs of an experiment's last launch (``experiment.json``)."""

    dir: Path
    reference: str
    variants: list[str]
    runs: list[Run]
    launcher: str = "local"
    alpha: float = 0.05  # the report's significance level
    metric: str = "final"  # which val top-1 the report's tests compare

    def save(self) -> None:
        manifest = {
            "experiment": self.dir.name, "reference": self.reference, "variants": self.variants,
            "launcher": self.launcher, "alpha": self.alpha, "metric": self.metric, "saved": time.strftime("%Y-%m-%d %H:%M:%S"),
            "runs": [r.to_dict(self.dir) for r in self.runs],
        }  # fmt: skip
        write_text(self.dir / MANIFEST, json.dumps(manifest, indent=1))

    @classmethod
    def load(cls, exp_dir: str | Path) -> Experiment:
        exp_dir = Path(exp_dir)
        manifest = read_json(exp_dir / MANIFEST)
        if not manifest.get("runs"):
            raise FileNotFoundError(
                f"{exp_dir / MANIFEST} not found or unreadable: {exp_dir} is not an experiment "
                "folder that `ablate` launched (give the folder, or the experiment name and "
                "--log_dir)"
            )
        runs = [Run(**{**r, "dir": exp_dir / r["dir"]}) for r in manifest["runs"]]
        return cls(exp_dir, manifest["reference"], manifest["variants"], runs,
                   manifest.get("launcher", "local"), manifest.get("alpha", 0.05),
                   manifest.get("metric", "final"))  # fmt: skip


@dataclass
class RunStatus:
    """Where one run stands, as its folder (and SLURM) tell."""

    run: Run
    state: str
    attempts: int = 0
    job_id: str | None = None
    host: str | None = None
    epoch: int | None = None
    step: int | None = None
    best_val_acc1: float | None = None
    elapsed_s: float | None = None
    log: Path | None = None
    message: str = ""


def slurm_job_state(job_id: str) -> str | None:
    """SLURM's state of a job (``scontrol``; no accounting database needed), or None when
    SLURM is not reachable or no longer knows the job."""
    if not job_id or shutil.which("scontrol") is None:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                             text=True, timeout=20).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        array = fields.get("ArrayJobId"), fields.get("ArrayTaskId")
        if fields.get("JobId") == job_id or "_".join(filter(None, array)) == job_id:
            return fields.get("JobState")
    return None


def _progress(run_dir: Path) -> tuple[int | None, int | None, float | None, str]:
    """Epoch, step and best val top-1 reached, from the run's event files."""
    if not list(run_dir.glob("events.out.tfevents.*")):
        return None, None, None, ""
    try:
        series = read_scalars(run_dir)
    except (DamagedRunError, OSError) as err:
        return None, None, None, f"event files unreadable: {err}"
    epoch = step = best = None
    if series.get("epoch"):
        last_step, last_epoch = series["epoch"][-1]
        epoch, step = int(last_epoch) + 1, int(last_step)  # epoch: 1-based, as "epoch 3 of 12"
    if series.get("val/acc1"):
        best = max(scalar_values(series, "val/acc1"))
    return epoch, step, best, ""


def read_status(run: Run, progress: bool = True) -> RunStatus:
    """The state of ``run``: finished, running (its lock is held, or SLURM runs its job),
    pending (never started, or queued), or what its last attempt recorded (failed,
    interrupted); an attempt that died without a word is interrupted, or failed when SLURM
    says its job ended so."""
    record, job = run.record, run.job
    status = RunStatus(run, "pending", attempts=int(record.get("attempts", 0)),
                       job_id=record.get("job_id") or job.get("job_id"),
                       host=record.get("host"), message=record.get("message", ""))  # fmt: skip
    if (run.dir / "fit.log").exists():
        status.log = run.dir / "fit.log"
    if progress and run.dir.is_dir():
        status.epoch, status.step, status.best_val_acc1, note = _progress(run.dir)
        status.message = status.message or note
    if record.get("started") or record.get("seconds"):
        running = record.get("state") == "running" and record.get("started")
        status.elapsed_s = float(record.get("seconds") or 0) + (
            time.time() - record["started"] if running else 0.0
        )
    finished = read_json(run.dir / FINISHED)
    if finished.get("fingerprint") == run.fingerprint:
        status.state, status.elapsed_s = "finished", finished.get("seconds", status.elapsed_s)
        status.message = ""
        return status
    holder = RunLock(run.dir).held_by() if run.dir.is_dir() else None
    if holder:
        status.state, status.message = "running", f"locked by {holder}"
        return status
    slurm = slurm_job_state(status.job_id) if status.job_id else None
    if slurm in SLURM_ACTIVE:
        status.state = "running" if slurm == "RUNNING" else "pending"
        if slurm != "RUNNING":
            status.message = f"SLURM job {status.job_id} is {slurm}"
        return status
    state = record.get("state")
    if state == "running" or state == "requeued":
        # Nobody holds the lock: the attempt's process is gone without a word (SIGKILL,
        # a node lost), or SLURM ended the job.
        if slurm is not None:
            status.state = "failed"
            status.message = f"SLURM job {status.job_id} ended {slurm} without finishing the run"
        else:
            status.state = "interrupted"
            status.message = "its process ended without finishing (killed?); a re-run resumes it"
    elif state in ("failed", "interrupted"):
        status.state = state
    elif job and slurm is not None:  # submitted, never started, and the job is over
        status.state = "failed"
        status.message = f"SLURM job {status.job_id} ended {slurm} before the run started"
        status.log = Path(job["stderr"]) if job.get("stderr") else status.log
    if status.state in ("failed", "interrupted") and job.get("stderr") and status.log is None:
        status.log = Path(job["stderr"])
    return status


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def status_table(experiment: Experiment, statuses: list[RunStatus]) -> str:
    """A plain-text table of the runs and the experiment's totals."""
    header = ["variant", "seed", "state", "epoch", "step", "best val top-1", "elapsed",
              "attempts", "job", "host"]  # fmt: skip
    rows = [header]
    for s in statuses:
        rows.append([
            s.run.variant, str(s.run.seed), s.state, _fmt(s.epoch), _fmt(s.step),
            _fmt(s.best_val_acc1, ".4f"), _duration(s.elapsed_s), str(s.attempts),
            s.job_id or "-", s.host or "-",
        ])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    counts = {state: sum(s.state == state for s in statuses) for state in STATES}
    total = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    best = [s for s in statuses if s.best_val_acc1 is not None]
    lines.append("")
    lines.append(f"{experiment.dir}: {len(statuses)} runs: {total}")
    if best:
        top = max(best, key=lambda s: s.best_val_acc1)
        lines.append(f"best val top-1 so far: {top.best_val_acc1:.4f} ({top.run.variant} "
                     f"seed {top.run.seed})")  # fmt: skip
    for s in statuses:
        if s.state in ("failed", "interrupted") or (s.message and s.state == "pending"):
            where = f" (log: {s.log})" if s.log else ""
            lines.append(f"{s.state}: {s.run.variant} seed {s.run.seed}: {s.message}{where}")
    return "\n".join(lines)
