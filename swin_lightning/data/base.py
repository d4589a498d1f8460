"""Shared plumbing of the classification data modules: loaders and the predict folder."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from swin_lightning.data.resumable import ResumableDataLoader, ResumableSampler

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class ImageListDataset(Dataset):
    """Every image file below ``root`` (sorted), yielding ``(image, index, error)`` for
    prediction. An unreadable image yields a blank image and the reason as ``error`` (empty
    for a good one), so one broken file does not stop the others' predictions."""

    def __init__(self, root: str | Path, transform: Callable):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"predict_dir {root} does not exist or is not a folder")
        self.paths = sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not self.paths:
            raise FileNotFoundError(
                f"predict_dir {root} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})"
            )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            with Image.open(self.paths[index]) as img:
                return self.transform(img.convert("RGB")), index, ""
        except (OSError, ValueError, SyntaxError) as err:  # what PIL raises for broken files
            blank = Image.new("RGB", (64, 64))
            return self.transform(blank), index, f"{type(err).__name__}: {err}"


class ClassificationDataModule(L.LightningDataModule):
    """Base of the data modules: batch size, workers, loaders and the predict folder.

    Subclasses set ``image_size``, ``num_classes`` and ``classes`` in ``__init__`` (they are
    linked into the model before it is built), fill ``train_set``/``val_set``/``test_set`` in
    ``setup`` and provide ``eval_transform`` (used for ``predict_dir`` images).

    Args:
        batch_size: Images per device and step.
        num_workers: Data-loading worker processes.
        pin_memory: Pin host memory for faster copies to the GPU.
        predict_dir: Folder of images for ``predict`` (searched recursively).
    """

    image_size: int
    num_classes: int
    classes: Sequence[str]
    collate_fn: Callable | None = None  # the loaders' (None: PyTorch's default)

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 2,
        pin_memory: bool = False,
        predict_dir: str | None = None,
    ):
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"data.batch_size={batch_size} must be > 0")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.predict_dir = predict_dir
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.predict_set: ImageListDataset | None = None

    def eval_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        raise NotImplementedError

    def eval_config(self) -> dict[str, Any]:
        """:meth:`eval_transform` as timm's data config (``input_size``, ``interpolation``,
        ``mean``, ``std``, ``crop_pct``; ``timm.data.create_transform(**config)`` rebuilds
        it): checkpoints store it, so a trained model is used without this data module."""
        interpolation = getattr(self, "interpolation", "bicubic")
        return {
            "input_size": [3, self.image_size, self.image_size],
            "interpolation": "bicubic" if interpolation == "random" else interpolation,
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "crop_pct": float(getattr(self, "crop_pct", 1.0)),
        }

    def finish_images(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        """The last transform steps, run on the device on whole batches (identity here:
        these modules' loaders yield finished float images)."""
        return images

    def example_images(self, n: int) -> torch.Tensor:
        """The first ``n`` validation images as the model sees them (for figures)."""
        if self.val_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not created the val split")
        samples = [self.val_set[i] for i in range(min(n, len(self.val_set)))]
        batch = self.on_before_batch_transfer((self.collate_fn or default_collate)(samples), 0)
        return self.finish_images(batch[0], train=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        training = self.trainer is not None and self.trainer.training
        if isinstance(batch, torch.Tensor):  # images alone (the model summary's example)
            return self.finish_images(batch, training)
        if not isinstance(batch, list | tuple) or not batch:
            return batch
        images, *rest = batch
        return type(batch)([self.finish_images(images, training), *rest])

    def setup(self, stage: str) -> None:
        if stage == "predict":
            if self.predict_dir is None:
                raise ValueError("predict needs data.predict_dir: a folder of images")
            self.predict_set = ImageListDataset(self.predict_dir, self.eval_transform())

    def _loader(self, dataset: Dataset | None, train: bool = False) -> DataLoader:
        """Evaluation: in order. Training: shuffled by (seed, epoch), sharded over the ranks,
        with its position in the epoch saved in checkpoints (exact mid-epoch resume)."""
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not created this split")
        kwargs = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
            "collate_fn": self.collate_fn,
        }
        if not train:
            return DataLoader(dataset, **kwargs)
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        seed = int(os.getenv("PL_GLOBAL_SEED", "0"))  # set by seed_everything, as Lightning does
        sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, seed=seed)
        if len(sampler) < self.batch_size:  # drop_last: not one full batch, 0 steps an epoch
            devices = f", {len(sampler)} on each of {world} devices" if world > 1 else ""
            raise ValueError(
                f"data.batch_size={self.batch_size} is larger than the training set "
                f"({len(dataset)} images{devices}): training drops the last "
                "incomplete batch (drop_last), so an epoch would have 0 steps; set "
                f"data.batch_size to at most {len(sampler)}"
            )
        return ResumableDataLoader(
            dataset, sampler=sampler, drop_last=True, generator=torch.Generator(), **kwargs
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set)
