"""Packed, streamed image data: an ImageFolder tree packed once into ``litdata`` chunks, then
read as a stream (local folder, or ``s3://``/``gs://``/... with a local cache) with exact
mid-epoch resume.

The layout of a packed folder (``python -m swin_lightning pack --root TREE --out DIR``) is
in :mod:`swin_lightning.data.pack_format`.

Opening a packed split reads its ``index.json`` only: no per-file ``stat``. Packing is
:mod:`swin_lightning.data.packer`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from swin_lightning.data.base import ClassificationDataModule
from swin_lightning.data.imagefolder import (
    ImageFolderDataModule,
)
from swin_lightning.data.pack_format import (
    BAD_LIST,
    META,
    PackError,
    read_meta,
    require_litdata,
)
from swin_lightning.data.tensor_transforms import (
    DECODE_CHOICES,
    DeviceDecode,
    collate_encoded,
    decode_bytes,
)

# The format's names, importable from here as before it had its own file (packing itself:
# swin_lightning.data.packer).
__all__ = ["BAD_LIST", "META", "DecodeSample", "PackError", "PackedDataModule", "read_meta"]


class DecodeSample:
    """litdata's per-sample transform: encoded bytes -> ``(augmented image, label)``.

    ``decode='pil'`` opens the bytes with PIL (timm's transforms), ``'tensor'`` decodes them
    with torchvision to a ``uint8`` tensor (transforms v2), ``'device'`` hands them over still
    encoded (the device decodes the batch).
    """

    def __init__(self, transform: Callable | None, decode: str = "pil"):
        self.transform = transform
        self.decode = decode

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        data = sample["image"]
        if self.decode == "device":
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), int(sample["label"])
        if self.decode == "tensor":
            image = decode_bytes(data)
        else:
            with Image.open(io.BytesIO(data)) as img:
                image = img.convert("RGB")
        return self.transform(image), int(sample["label"])


class PackedDataModule(ImageFolderDataModule):
    """A dataset packed by ``python -m swin_lightning pack``, streamed with litdata.

    Training streams the train split with litdata's chunk-wise shuffle (a new order every
    epoch from the seed), sharded over ranks and nodes; the loader's position goes into
    checkpoints, so a killed run resumes on the next sample, also with another number of
    workers. Augmentation and evaluation transforms are the ImageFolder module's.

    Args:
        root: Packed folder: a local path, or a URI (``s3://``, ``gs://``, ``azure://``, or
            ``local:/path`` to exercise the remote path on a local folder).
        cache_dir: Local folder for the chunks of a remote root (default: litdata's).
        max_cache_size: Most disk the chunk cache may use, e.g. '50GB'.
        decode: 'pil' (timm's PIL transforms), 'tensor' (torchvision decode + transforms v2 in
            the workers) or 'device' (workers only read; the JPEGs of a batch are decoded
            together on the training device, nvJPEG on a GPU, and cropped, flipped and
            RandAugmented there with torchvision's RandAugment).
        shuffle_seed: Seed of the streaming shuffle (null: the run's seed_everything seed).
        **kwargs: The ImageFolder module's keys (image_size, augmentation, batch_size, ...).
    """

    def __init__(
        self,
        root: str,
        cache_dir: str | None = None,
        max_cache_size: str = "100GB",
        decode: str = "tensor",
        shuffle_seed: int | None = None,
        **kwargs: Any,
    ):
        self.uri = str(root)
        self.cache_dir = cache_dir
        self.max_cache_size = max_cache_size
        self.shuffle_seed = shuffle_seed
        kwargs.pop("skip_corrupt", None)  # packing already left unreadable images out
        super().__init__(root, decode=decode, **kwargs)
        self.device_decode = None
        if decode == "device":
            aug = {k: self.aug[k] for k in ("scale", "ratio", "hflip", "auto_augment")}
            self.device_decode = DeviceDecode(
                self.image_size, interpolation=self.interpolation, crop_pct=self.crop_pct, **aug
            )
            self.collate_fn = collate_encoded

    decode_choices = (*DECODE_CHOICES, "device")

    def train_transform(self) -> Callable | None:
        return None if self.decode == "device" else super().train_transform()

    def split_eval_transform(self) -> Callable | None:
        return None if self.decode == "device" else super().split_eval_transform()

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """``decode: device``: decode and augment the batch's JPEGs on the training device."""
        if self.device_decode is None or not isinstance(batch, list | tuple):
            return batch
        if not batch or not isinstance(batch[0], list):
            return batch
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        training = trainer is not None and trainer.training
        return [self.device_decode(batch[0], device, training), *batch[1:]]

    def read_classes(self) -> list[str]:
        meta = read_meta(self.uri, self.cache_dir)
        self.meta = meta
        return list(meta["classes"])

    def _split_path(self, split: str) -> str:
        name = self.split_dirs[split]
        if name not in self.meta["splits"]:
            raise FileNotFoundError(
                f"{self.uri} has no packed split {name!r} (it holds "
                f"{', '.join(self.meta['splits'])}); set data.{split}_dir"
            )
        return f"{self.uri.rstrip('/')}/{name}"

    def _split(self, split: str, transform: Callable):
        litdata = require_litdata()
        seed = self.shuffle_seed
        if seed is None:
            seed = int(os.getenv("PL_GLOBAL_SEED", "0"))
        cache = None
        if self.cache_dir is not None:
            cache = str(Path(self.cache_dir) / self.split_dirs[split])
        return litdata.StreamingDataset(
            self._split_path(split),
            cache_dir=cache,
            shuffle=split == "train",
            drop_last=split == "train",
            seed=seed,
            max_cache_size=self.max_cache_size,
            transform=DecodeSample(transform, self.decode),
        )

    def _loader(self, dataset, train: bool = False):
        litdata = require_litdata()
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not created this split")
        if train and len(dataset) < self.batch_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} is larger than this device's share of the "
                f"training set ({len(dataset)} samples); set data.batch_size to at most "
                f"{len(dataset)}"
            )
        return litdata.StreamingDataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            collate_fn=self.collate_fn,
        )

    def predict_dataloader(self):
        return ClassificationDataModule._loader(self, self.predict_set)
