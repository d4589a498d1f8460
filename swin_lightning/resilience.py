"""Crash-safe training callbacks: step checkpoints, SIGTERM saves, a NaN guard, the random
state for exact resume, and checked checkpoint writes.

- :class:`StepCheckpoint` refreshes ``checkpoints/last.ckpt`` every N optimizer steps and when a
  SIGTERM (preemption) stops the run; Lightning writes checkpoints atomically (a temporary file
  moved into place), so a kill while saving keeps the previous ``last.ckpt``.
- :class:`NonFiniteLossGuard` stops on a NaN/inf loss before the optimizer step, so no NaN
  state is ever saved.
- :class:`ResumeState` saves and restores the training loader's position
  (:mod:`swin_lightning.data.resumable`) and the torch, CUDA, numpy and python random states.
- :class:`CheckedCheckpointIO` saves checkpoints through :mod:`swin_lightning.storage`
  (temporary file in the same folder, fsync, rename; a failed write is an error) and loads
  them with ``weights_only=True`` and a clear error for damaged files; :class:`Preflight`
  checks before the first batch that the run's folders take files and hold room for two
  checkpoints.

Run-folder resolution and claiming are in :mod:`swin_lightning.run_folder`.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from swin_lightning.protocol import CHECKPOINTS, LAST_CKPT
from swin_lightning.storage import (
    check_writable,
    checkpoint_bytes_estimate,
    load_checkpoint,
    save_checkpoint,
)


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
        path = checkpoint_dir(trainer) / LAST_CKPT
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
        last = checkpoint_dir(trainer) / LAST_CKPT
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
