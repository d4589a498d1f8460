"""Callbacks the CLI adds by default: image throughput, the run's cost (time, peak memory,
devices) and the predictions CSV (the attention pictures callback lives with the pictures, in
visualize.py)."""

from __future__ import annotations

import csv
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ThroughputMonitor

from swin_lightning.storage import atomic_open


class PartialPredictionError(RuntimeError):
    """Some predict images could not be read: the others' rows are written, these listed."""


def images_in_batch(batch: Any) -> int:
    """Batch size of an ``(images, targets)`` batch."""
    return int(batch[0].shape[0])


class ImageThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting images: logs samples/s and batches/s.

    Args:
        window_size: Number of batches the rates are averaged over.
    """

    def __init__(self, window_size: int = 20):
        super().__init__(batch_size_fn=images_in_batch, window_size=window_size)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far in MiB: CUDA's peak allocation on a GPU, the peak
    resident set size (RSS) of the process on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class RunCostMonitor(L.Callback):
    """Logs what a fit costs, for the ablation report's cost columns, after every training
    epoch (its validation included):

    - ``cost/wall_seconds``: seconds spent in the epochs so far. Carried across a resume in
      the checkpoint; the part of an epoch that a kill cut short (after its last save) is
      not counted, nor start-up.
    - ``cost/peak_mem_mb``: :func:`peak_memory_mb` of rank 0.
    - ``cost/gpus``: GPUs of the run (0 on the CPU) and ``cost/cpu_threads``: torch threads
      per process times processes; a report turns wall time into GPU- or CPU-hours with them.
    """

    def __init__(self):
        self.wall_seconds = 0.0
        self._epoch_start: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch_start is None:
            return
        self.wall_seconds += time.monotonic() - self._epoch_start
        self._epoch_start = None
        if trainer.logger is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        on_gpu = pl_module.device.type == "cuda"
        trainer.logger.log_metrics(
            {
                "cost/wall_seconds": self.wall_seconds,
                "cost/peak_mem_mb": peak_memory_mb(pl_module.device),
                "cost/gpus": float(trainer.world_size if on_gpu else 0),
                "cost/cpu_threads": float(torch.get_num_threads() * trainer.world_size),
            },
            step=trainer.global_step,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"wall_seconds": self.wall_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wall_seconds = float(state_dict.get("wall_seconds", 0.0))


class PredictionCSVWriter(BasePredictionWriter):
    """Writes ``predict`` results as a CSV: image path, then top-k classes and probabilities.

    Images that cannot be read get no row; they are listed (path, reason) in
    ``<output stem>.unreadable.csv`` beside it, and predict then fails with exit code 1.

    Args:
        output: CSV path; default ``<log_dir>/predictions.csv`` of the run.
        top_k: How many classes per image.
    """

    def __init__(self, output: str | None = None, top_k: int = 5):
        super().__init__(write_interval="epoch")
        if top_k < 1:
            raise ValueError(f"prediction_writer.top_k={top_k} must be >= 1")
        self.output = output
        self.top_k = top_k
        self.written: Path | None = None

    def write_on_epoch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        datamodule = trainer.datamodule
        paths = datamodule.predict_set.paths
        classes = list(datamodule.classes) or [str(i) for i in range(pl_module.net.num_classes)]
        indices = torch.cat([p["indices"] for p in predictions]).tolist()
        errors = [e for p in predictions for e in p.get("errors") or [""] * len(p["indices"])]
        probs = torch.cat([p["probs"] for p in predictions]).float().cpu()
        k = min(self.top_k, probs.shape[1])
        top_p, top_i = probs.topk(k, dim=1)
        out = Path(self.output) if self.output else Path(trainer.log_dir or ".") / "predictions.csv"
        if trainer.world_size > 1:
            out = out.with_name(f"{out.stem}.rank{trainer.global_rank}{out.suffix}")
        with atomic_open(out, "w", newline="") as f:
            writer = csv.writer(f)
            header = ["path"]
            for j in range(1, k + 1):
                header += [f"class_{j}", f"prob_{j}"]
            writer.writerow(header)
            for row, index in enumerate(indices):
                if errors[row]:
                    continue
                line = [str(paths[index])]
                for j in range(k):
                    line += [classes[int(top_i[row, j])], f"{float(top_p[row, j]):.6f}"]
                writer.writerow(line)
        self.written = out
        bad = [(str(paths[i]), e) for i, e in zip(indices, errors, strict=True) if e]
        if bad:
            listing = out.with_name(f"{out.stem}.unreadable.csv")
            with atomic_open(listing, "w", newline="") as f:
                csv.writer(f).writerows([("path", "reason"), *bad])
            raise PartialPredictionError(
                f"predict: {len(bad)} of {len(indices)} images could not be read and have no "
                f"row in {out} (the other {len(indices) - len(bad)} do); they are listed in "
                f"{listing}, first: {bad[0][0]} ({bad[0][1]})"
            )
