"""Callbacks the CLI adds by default: image throughput and the predictions CSV."""

from __future__ import annotations

import csv
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


class WindowAttentionImages(L.Callback):
    """TensorBoard pictures: windows, shift and mask once per run; attention maps while training.

    Args:
        every_n_epochs: Log attention maps of a fixed validation batch every n epochs (0: never).
        num_images: Images in that fixed batch.
        stage: Which stage (0-based) to picture.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 2, stage: int = 0):
        if every_n_epochs < 0 or num_images < 1 or stage < 0:
            raise ValueError(
                "attention_images: every_n_epochs >= 0, num_images >= 1 and stage >= 0 required"
            )
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.stage = stage
        self._batch: torch.Tensor | None = None

    def _writer(self, trainer: L.Trainer):
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        return logger.experiment if logger is not None and trainer.is_global_zero else None

    def _blocks(self, net):
        if self.stage >= len(net.layers):
            raise ValueError(
                f"attention_images.stage={self.stage}: the model has {len(net.layers)} stages"
            )
        return list(net.layers[self.stage].blocks)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = self._writer(trainer)
        if writer is None:
            return
        from swin_lightning.visualize import plot_attention_mask, plot_windows

        blocks = self._blocks(pl_module.net)
        shifted = blocks[1] if len(blocks) > 1 else None
        writer.add_figure("windows/partition_and_shift", plot_windows(blocks[0], shifted), 0)
        if shifted is not None:
            writer.add_figure("windows/attention_mask", plot_attention_mask(shifted), 0)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = self._writer(trainer)
        epoch = trainer.current_epoch
        if writer is None or trainer.sanity_checking or not self.every_n_epochs:
            return
        if epoch % self.every_n_epochs:
            return
        if self._batch is None:
            self._batch = trainer.datamodule.example_images(self.num_images)
        from swin_lightning.visualize import plot_attention_maps

        images = self._batch.to(pl_module.device)
        fig = plot_attention_maps(pl_module.net, images, self.stage)
        writer.add_figure("attention/maps", fig, trainer.global_step)
