"""The protocol between ``tune`` and the ``fit`` it starts for a trial: the trial's
environment variable (encoded here, decoded here), the study's storage and pruner (built the
same way on both sides), and :class:`TrialPruning`, the callback that reports the trial's
metric and stops a pruned run."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L

from swin_lightning.protocol import PRUNED, TRIAL_ENV
from swin_lightning.storage import write_text


@dataclass(frozen=True)
class TrialEnv:
    """What a trial's ``fit`` needs to find its trial: the study's storage URL and name,
    the trial's number, the metric reported and the study's pruner."""

    storage: str
    study: str
    number: int
    metric: str
    pruner: str

    def encode(self) -> dict[str, str]:
        """The environment entry that hands this trial to a ``fit`` process."""
        fields = (self.storage, self.study, str(self.number), self.metric, self.pruner)
        return {TRIAL_ENV: "\t".join(fields)}

    @classmethod
    def from_env(cls) -> TrialEnv | None:
        value = os.environ.get(TRIAL_ENV)
        if not value:
            return None
        storage, study, number, metric, pruner = value.split("\t")
        return cls(storage, study, int(number), metric, pruner)


class StorageDamaged(ValueError):
    """An Optuna storage that cannot be read: one line saying which and what to do."""

    def __init__(self, url: str, err: BaseException):
        cause = " ".join(str(getattr(err, "orig", None) or err).split())[:200]
        super().__init__(
            f"the study storage {url} cannot be read ({type(err).__name__}: {cause}); if it "
            "is a damaged file, move it away and run the same tune command again: a new "
            "study starts (the old trial folders are moved aside, never reused), or restore "
            "the file from a backup"
        )


def open_storage(url: str) -> Any:
    """An Optuna storage from a URL; ``journal:<file>`` is Optuna's journal file storage. It
    is read once here, so a damaged file is a :class:`StorageDamaged`, not a traceback."""
    import optuna

    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            backend = JournalFileBackend(url.removeprefix("journal:"))
            storage = optuna.storages.JournalStorage(backend)
        else:
            storage = optuna.storages.get_storage(url)
        storage.get_all_studies()  # reads the file: a damaged one fails here
    except Exception as err:  # sqlalchemy's and the journal's errors have no common base
        raise StorageDamaged(url, err) from None
    return storage


def make_pruner(name: str) -> Any:
    """The study's pruner; the trial's run builds the same one to decide (``should_prune``)."""
    import optuna

    pruners = {
        # Not on the first epoch's validation: in these recipes it ends the warm-up, where
        # every trial is still near chance and a ranking is noise.
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(),
        "none": lambda: optuna.pruners.NopPruner(),
    }
    return pruners[name]()


class TrialPruning(L.Callback):
    """Reports a ``tune`` trial's metric to its Optuna study after every validation, and stops
    the run (cleanly, at the epoch's end) when the study's pruner says so, leaving
    ``pruned.json`` in the run folder. Added by the CLI for runs that ``tune`` starts.

    Args:
        storage: Optuna storage URL of the study.
        study: Study name.
        number: The trial's number in the study.
        metric: Logged metric reported (the study's).
        pruner: The study's pruner (``median``, ``hyperband``, ``none``).
    """

    def __init__(self, storage: str, study: str, number: int, metric: str, pruner: str):
        import optuna

        self.metric = metric
        backend = open_storage(storage)
        loaded = optuna.load_study(study_name=study, storage=backend, pruner=make_pruner(pruner))
        # The storage's public API maps (study, trial number) to the trial's id.
        study_id = backend.get_study_id_from_name(study)
        trial_id = backend.get_trial_id_from_study_id_trial_number(study_id, number)
        self.trial = optuna.trial.Trial(loaded, trial_id)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            return
        self.trial.report(float(value), step=trainer.current_epoch)
        if self.trial.should_prune():
            folder = Path(trainer.log_dir or trainer.default_root_dir)
            record = {"epoch": trainer.current_epoch, "value": float(value)}
            write_text(folder / PRUNED, json.dumps(record))
            trainer.should_stop = True


def trial_pruning_from_env() -> TrialPruning | None:
    """The pruning callback of a run that ``tune`` started (it sets :data:`TRIAL_ENV`)."""
    trial = TrialEnv.from_env()
    if trial is None:
        return None
    return TrialPruning(trial.storage, trial.study, trial.number, trial.metric, trial.pruner)
