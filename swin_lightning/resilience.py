"""Crash-safe training: step checkpoints, SIGTERM saves, a NaN guard and exact mid-epoch resume.

- :class:`StepCheckpoint` refreshes ``checkpoints/last.ckpt`` every N optimizer steps and when a
  SIGTERM (preemption) stops the run; Lightning writes checkpoints atomically (a temporary file
  moved into place), so a kill while saving keeps the previous ``last.ckpt``.
- :class:`NonFiniteLossGuard` stops on a NaN/inf loss before the optimizer step, so no NaN
  state is ever saved.
- :class:`ResumableSampler` and :class:`ResumableDataLoader` make the training order a function
  of (seed, epoch) and can start an epoch part-way; :class:`ResumeState` saves and restores
  the loader's position and the torch, CUDA, numpy and python random states.
- :func:`resolve_resume` turns ``--ckpt_path last|auto`` into a checkpoint path (checked to be
  intact) and pins the logger to the resumed run's folder; :func:`claim_run_folder` gives a
  new run its own ``version_<n>`` folder and locks the run's folder for this process.
- :class:`CheckedCheckpointIO` saves checkpoints through :mod:`swin_lightning.storage`
  (temporary file in the same folder, fsync, rename; a failed write is an error) and loads
  them with ``weights_only=True`` and a clear error for damaged files; :class:`Preflight`
  checks before the first batch that the run's folders take files and hold room for two
  checkpoints.
"""

from __future__ import annotations

import random
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from swin_lightning.protocol import CHECKPOINTS, LAST_CKPT
from swin_lightning.storage import (
    RunLock,
    WriteError,
    check_writable,
    checkpoint_bytes_estimate,
    load_checkpoint,
    remove_stale_tmp,
    save_checkpoint,
)

LAST = LAST_CKPT  # ModelCheckpoint.CHECKPOINT_NAME_LAST + FILE_EXTENSION


class CheckedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, writing and reading through :mod:`swin_lightning.storage`.

    Lightning's own save goes through a temporary file under ``TMPDIR`` and a move, which is
    a copy when logs live on another file system (a kill or a full disk then leaves a partial
    ``last.ckpt``), and some write failures end in exit code 0. Here the temporary file lies
    beside the checkpoint and is renamed only when complete; any failure raises
    :class:`~swin_lightning.storage.WriteError`. Remote URLs (``s3://``...) keep Lightning's path.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options=None) -> None:
        if "://" in str(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_checkpoint(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ):
        if "://" in str(path) or weights_only is False:
            return super().load_checkpoint(path, map_location, weights_only)
        return load_checkpoint(path, map_location if map_location is not None else "cpu")


class Preflight(L.Callback):
    """Before the first batch: the log and checkpoint folders take files and hold room for two
    full checkpoints (weights, buffers and two optimizer moments per parameter); otherwise
    one error naming the folder, the space needed and the space free."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        folders = [checkpoint_dir(trainer)]
        if trainer.log_dir:  # broadcast from rank 0: every rank asks
            folders.append(Path(trainer.log_dir))
        error = None
        if trainer.is_global_zero:
            need = 2 * checkpoint_bytes_estimate(pl_module)
            try:
                check_writable(folders[0], need, what="two checkpoints of this model")
                for folder in folders[1:]:
                    check_writable(folder)
            except OSError as err:
                error = err
        # Every rank stops together, or the others would wait in the first collective.
        if trainer.strategy.broadcast(error is not None) and error is None:
            raise OSError("preflight failed on rank 0: see its error")
        if error is not None:
            raise error


def checkpoint_dir(trainer: L.Trainer) -> Path:
    """The run's checkpoint folder: the ModelCheckpoint's, else ``<log_dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        return Path(callback.dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir) / CHECKPOINTS


class StepCheckpoint(L.Callback):
    """Refreshes ``checkpoints/last.ckpt`` every N optimizer steps, every epoch and on SIGTERM.

    A run killed at any point (even SIGKILL) loses at most ``every_n_train_steps`` steps and
    resumes with ``fit --ckpt_path last``. The ``checkpoint`` callback writes the same file
    when it saves a best checkpoint, so ``last.ckpt`` is always the newest state.

    Args:
        every_n_train_steps: Save every n optimizer steps (0: only at epoch ends and on
            SIGTERM).
        on_sigterm: Save when a SIGTERM (preemption, SLURM, ``kill``) or a Ctrl+C (SIGINT)
            stops the run; it stops at the next batch boundary and exits with code 143
            (SIGTERM) or 130 (SIGINT). A second Ctrl+C stops at once, without saving.
    """

    def __init__(self, every_n_train_steps: int = 100, on_sigterm: bool = True):
        if every_n_train_steps < 0:
            raise ValueError(
                f"step_checkpoint.every_n_train_steps={every_n_train_steps} must be >= 0"
            )
        self.every_n_train_steps = every_n_train_steps
        self.on_sigterm = on_sigterm
        self.saved_step: int | None = None
        self.saved_path: Path | None = None
        self.stop_signal: int | None = None
        self._previous_sigint: Any = None

    def _skip(self, trainer: L.Trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.sanity_checking

    def save(self, trainer: L.Trainer) -> Path:
        """Write ``last.ckpt`` of the current state (all ranks must call this)."""
        path = checkpoint_dir(trainer) / LAST
        trainer.save_checkpoint(path, weights_only=False)
        self.saved_step, self.saved_path = trainer.global_step, path
        return path

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Ctrl+C goes the way of SIGTERM: Lightning stops at the next batch boundary, where
        # the state is consistent, and on_exception saves it. (Lightning's own SIGINT path
        # stops mid-step and saves nothing.)
        self.stop_signal = None
        if self.on_sigterm and not self._skip(trainer) and _in_main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.stop_signal == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl+C: stop now
        self.stop_signal = signal.SIGINT
        rank_zero_info(
            "Ctrl+C: stopping after this batch and saving last.ckpt (press it again to stop "
            "at once, without saving)"
        )
        signal.raise_signal(signal.SIGTERM)  # Lightning's handler: the stop flag, DDP ranks

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None and _in_main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        n = self.every_n_train_steps
        step = trainer.global_step
        # With gradient accumulation the step only moves every few batches: save once per step.
        if n and step and step % n == 0 and step != self.saved_step and not self._skip(trainer):
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning 2.6's ModelCheckpoint(save_last=True) refreshes last.ckpt only in epochs
        # that save a top-k checkpoint: without this, last.ckpt stays behind when the
        # monitored metric does not improve. (Saved even if a step save came at this step: this
        # state is after the epoch's validation.)
        if not self._skip(trainer):
            # Compute (and sync) the epoch's metrics before saving, as ModelCheckpoint does.
            # Under DDP only rank 0's progress bar reads them at this point; a rank that met
            # the save's barrier first would pair it with rank 0's metric all-gather and hang.
            _ = trainer.callback_metrics
            self.save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        # Lightning raises SIGTERMException between batches, where the state is consistent;
        # other exceptions (a NaN loss, Ctrl+C mid-step) may leave it half-updated.
        if not (self.on_sigterm and isinstance(exception, SIGTERMException)):
            return
        if self._skip(trainer) or trainer.state.fn != "fit":
            return
        path = self.save(trainer)
        name = "SIGINT (Ctrl+C)" if self.stop_signal == signal.SIGINT else "SIGTERM"
        rank_zero_info(
            f"{name}: saved {path} at global step {trainer.global_step}; resume with "
            "`fit --config ... --ckpt_path last` (or `--ckpt_path auto`)."
        )


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class NonFiniteLossError(RuntimeError):
    """Raised by :class:`NonFiniteLossGuard` when the training loss is NaN or infinite."""


class NonFiniteLossGuard(L.Callback):
    """Stops training with a clear error when the training loss is NaN or infinite.

    It checks the loss before the backward pass, so the weights, optimizer state and
    ``last.ckpt`` stay those of the last good step. Each check synchronises the device once
    (and all ranks under DDP) per batch.

    Args:
        enabled: Check the loss of every training batch.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        if not self.enabled:
            return
        bad = not bool(torch.isfinite(loss.detach()).all())
        # Every rank must stop together, or the others would wait in the gradient all-reduce.
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        value = float(loss.detach().float().flatten()[0]) if bad else float("nan")
        where = "" if trainer.world_size == 1 else " on this rank" if bad else " on another rank"
        loop = trainer.fit_loop.epoch_loop
        last = checkpoint_dir(trainer) / LAST
        kept = (
            f"The last good checkpoint, {last}, was not overwritten: resume from it with "
            "`--ckpt_path last` after changing the settings."
            if last.exists()
            else "No checkpoint had been saved yet."
        )
        raise NonFiniteLossError(
            f"Training loss is {value}{where} at global step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}, batch {loop.batch_idx}); stopped before the "
            f"optimizer step. {kept} Try: a lower learning rate "
            "(--model.optimizer.init_args.lr) or a longer warmup "
            "(--model.lr_scheduler.init_args.warmup_epochs), gradient clipping "
            "(--trainer.gradient_clip_val=1.0), and bf16-mixed rather than 16-mixed precision "
            "(--config configs/trainer/bf16.yaml)."
        )


class ResumeState(L.Callback):
    """Checkpoints what Lightning leaves out for an exact resume: random states, loader position.

    Random states (torch, CUDA, numpy, python) are not in Lightning's checkpoints. The
    position of a :class:`ResumableDataLoader` is, but Lightning hands it back only when the
    loader is built after the checkpoint is loaded, and ``configure_optimizers`` builds it
    earlier (``estimated_stepping_batches``). Both are restored when training starts, after
    the sanity check (which draws random numbers too), so a resumed run trains on the same
    batches with the same dropout, drop path and Mixup draws as an uninterrupted one. Under
    DDP rank 0's states are saved; ranks seeded alike draw alike.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._trainer: L.Trainer | None = None

    def state_dict(self) -> dict[str, Any]:
        # Tensors and builtins only, so checkpoints still load with torch.load(weights_only=True).
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        rng: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state: dict[str, Any] = {"rng": rng}
        loader = self._loader(self._trainer)
        if loader is not None:
            state["train_loader"] = loader.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    @staticmethod
    def _loader(trainer: L.Trainer | None) -> Any | None:
        """The training loader if it keeps its position: a :class:`ResumableDataLoader`, or a
        streaming loader with ``state_dict``/``load_state_dict`` (litdata's)."""
        loader = trainer.train_dataloader if trainer is not None else None
        stateful = callable(getattr(loader, "state_dict", None)) and callable(
            getattr(loader, "load_state_dict", None)
        )
        return loader if stateful else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state, self._pending = self._pending, None
        if state is None:
            return
        loader = self._loader(trainer)
        if loader is not None and "train_loader" in state:
            loader.load_state_dict(state["train_loader"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        kind, keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(rng["python"])
        cuda = rng.get("cuda")
        if (
            cuda is not None
            and torch.cuda.is_available()
            and len(cuda) == torch.cuda.device_count()
        ):
            torch.cuda.set_rng_state_all(cuda)


class ResumableSampler(DistributedSampler):
    """Training order shuffled by (seed, epoch), sharded over ranks, startable part-way.

    A ``DistributedSampler`` even on one device: Lightning calls its ``set_epoch`` every epoch
    and keeps it under DDP (it only injects its own sampler into loaders without one), so the
    order depends on the seed and the epoch alone, never on the global random state.
    ``skip`` drops that many indices from the next epoch's start (set by the loader on resume).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch is saved in checkpoints.

    Lightning stores ``state_dict()`` of a stateful training loader in the checkpoint and hands
    it to ``load_state_dict`` on resume. A resumed epoch then skips the batches already trained
    on (skipping indices, loading nothing) and continues with the same order. Iteration starts
    lazily, after Lightning has called ``set_epoch``, and worker seeds derive from (seed, epoch).
    With ``num_workers > 0`` random augmentations of a resumed epoch differ (each worker's
    random stream depends on the batches it has seen), the order does not.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._epoch = 0
        self._batches = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        sampler = self.sampler
        epoch = int(getattr(sampler, "epoch", 0))
        resume, self._resume = self._resume, None
        skip = 0
        if resume is not None and resume["epoch"] == epoch and hasattr(sampler, "skip"):
            skip = resume["batches"]
            sampler.skip = skip * self.batch_size
        if self.generator is not None:
            seed = int(getattr(sampler, "seed", 0))
            self.generator.manual_seed((seed + 1) * 1_000_003 + epoch)
        self._epoch, self._batches = epoch, skip
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}


# ---------------------------------------------------------------------- --ckpt_path last|auto
def _version_key(path: Path) -> tuple[float, int]:
    match = re.fullmatch(r"version_(\d+)", path.parent.parent.name)
    return path.stat().st_mtime, int(match.group(1)) if match else -1


def _logger_args(config: Any) -> Any | None:
    """The ``init_args`` of the first logger with save_dir, name and version (TensorBoard, CSV)."""
    loggers = config.trainer.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    for logger in loggers:
        args = getattr(logger, "init_args", None) if hasattr(logger, "class_path") else None
        if args is not None and {"save_dir", "name", "version"} <= set(vars(args)):
            return args
    return None


def _run_dir_name(version: int | str) -> str:
    return version if isinstance(version, str) else f"version_{version}"


def resolve_resume(config: Any, subcommand: str) -> Path | None:
    """Resolve ``ckpt_path`` ``last``/``auto`` and pin the logger to the resumed run's folder.

    ``last``: the newest ``checkpoints/last.ckpt`` (by modification time) among this
    experiment's runs (``<save_dir>/<name>/*``, or the pinned ``version``); an error if there
    is none. ``auto``: the same, or a fresh run when there is none. For ``fit``, a checkpoint
    that is a run's ``last.ckpt`` inside this experiment (found or given as a path) makes the
    logger write into that run's folder; TensorBoard hides the steps logged after the
    checkpoint (``purge_step``), which are trained again. Returns the checkpoint or None.
    """
    requested = config.get("ckpt_path")
    if requested is None:
        return None
    logger = _logger_args(config)
    root = Path(logger.save_dir) / (logger.name or "") if logger is not None else None
    dirpath = config.get("checkpoint", {}).get("dirpath") if "checkpoint" in config else None
    ckpt: Path | None
    if str(requested) in ("last", "auto"):
        if dirpath:
            runs = [Path(dirpath).parent]
        elif root is None:
            runs = [Path(config.trainer.get("default_root_dir") or ".")]
        elif logger.version is not None:
            runs = [root / _run_dir_name(logger.version)]
        else:
            runs = sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []
        found = [r / CHECKPOINTS / LAST for r in runs if (r / CHECKPOINTS / LAST).exists()]
        if dirpath:
            found = [Path(dirpath) / LAST] if (Path(dirpath) / LAST).exists() else []
        if not found:
            if str(requested) == "auto":
                config.ckpt_path = None
                return None
            where = Path(dirpath) if dirpath else (root or Path(".")) / "*" / CHECKPOINTS
            raise ValueError(
                f"--ckpt_path last: no {LAST} under {where}. Start a new run without "
                "--ckpt_path, pass a checkpoint file, or use --ckpt_path auto (resume when "
                "there is a checkpoint, start fresh otherwise)."
            )
        ckpt = max(found, key=_version_key)
        config.ckpt_path = str(ckpt)
    else:
        ckpt = Path(str(requested))
    # A damaged, truncated or foreign file stops here, naming the newest intact checkpoint.
    step = int(load_checkpoint(ckpt, mmap=True)["global_step"])
    if subcommand != "fit" or logger is None or root is None:
        return ckpt
    run = ckpt.resolve().parent.parent
    is_last = re.fullmatch(r"last(-v\d+)?\.ckpt", ckpt.name) is not None
    if ckpt.parent.name == CHECKPOINTS and run.parent == root.resolve() and is_last:
        if logger.version is None:
            logger.version = run.name
        if _run_dir_name(logger.version) == run.name:
            logger.purge_step = step
            print(f"Resuming {ckpt} (step {step}), logging into {run}", file=sys.stderr)
    return ckpt


def claim_run_folder(config: Any, subcommand: str) -> RunLock | None:
    """Give this process its run folder: a new run gets a fresh ``version_<n>`` (created
    atomically, so two runs started at once never share one), and the folder is locked
    (:class:`~swin_lightning.storage.RunLock`) until the process ends. A ``fit`` without
    ``--ckpt_path`` into a folder that already holds checkpoints is refused: it would
    overwrite that run. Called before anything is written; on rank 0 only.
    """
    if config.trainer.get("fast_dev_run") or rank_zero_only.rank != 0:
        return None
    logger = _logger_args(config)
    dirpath = config.get("checkpoint", {}).get("dirpath") if "checkpoint" in config else None
    created = False
    if dirpath:
        folder = Path(dirpath)
    elif logger is not None:
        root = Path(logger.save_dir) / (logger.name or "")
        if logger.version is None:
            logger.version, created = _new_version(root), True
        folder = root / _run_dir_name(logger.version)
        _share_run_folder(config, logger)
    else:
        folder = Path(config.trainer.get("default_root_dir") or ".") / CHECKPOINTS
    lock = RunLock(folder).acquire()
    lock.created = created
    checkpoints = folder if dirpath or logger is None else folder / CHECKPOINTS
    if subcommand == "fit" and config.get("ckpt_path") is None:
        earlier = sorted(checkpoints.glob("*.ckpt")) if checkpoints.is_dir() else []
        if earlier:
            lock.release()
            raise ValueError(
                f"{folder} already holds a run ({earlier[0].name}); a new fit would overwrite "
                "it. Resume it with --ckpt_path last, or leave "
                "trainer.logger.init_args.version unset (or set checkpoint.dirpath) for a new "
                "folder"
            )
    remove_stale_tmp(checkpoints)
    remove_stale_tmp(folder)
    return lock


def _share_run_folder(config: Any, first: Any) -> None:
    """A CSV logger beside the first logger writes into that run's folder, ``csv/`` (a
    resumed run: ``csv_2/``, ``csv_3/``, ...; Lightning's CSVLogger would delete an earlier
    ``metrics.csv`` in the folder it is given)."""
    loggers = config.trainer.get("logger")
    run = Path(first.save_dir) / (first.name or "") / _run_dir_name(first.version)
    for logger in loggers if isinstance(loggers, list) else []:
        args = getattr(logger, "init_args", None) if hasattr(logger, "class_path") else None
        if args is None or args is first or not str(logger.class_path).endswith("CSVLogger"):
            continue
        sub, n = "csv", 1
        while (run / sub).exists():
            n += 1
            sub = f"csv_{n}"
        args.save_dir, args.name, args.version = first.save_dir, first.name, f"{run.name}/{sub}"


def _new_version(root: Path) -> int:
    """The next ``version_<n>`` below ``root``, created here (mkdir is atomic)."""
    existing = [int(m.group(1)) for p in root.glob("version_*")
                if (m := re.fullmatch(r"version_(\d+)", p.name))]  # fmt: skip
    version = max(existing, default=-1) + 1
    while True:
        try:
            root.mkdir(parents=True, exist_ok=True)
            (root / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1
        except OSError as err:
            raise WriteError(root / f"version_{version}", err) from err
