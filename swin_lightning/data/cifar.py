"""CIFAR-10 and CIFAR-100 from the official python-pickle archives.

torchvision downloads (and checks the archive's MD5) when ``download: true``; reading is
done here, so any folder holding the extracted ``cifar-10-batches-py`` /
``cifar-100-python`` files works, offline.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision import transforms as T

from swin_lightning.data.base import ClassificationDataModule


class CIFARArrays(Dataset):
    """Images ``(N, 32, 32, 3)`` uint8 and labels from a list of CIFAR pickle files."""

    def __init__(self, images: np.ndarray, labels: list[int], transform: Callable | None = None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index])
        return (self.transform(img) if self.transform else img), self.labels[index]


def _read_batches(files: list[Path], label_key: str) -> tuple[np.ndarray, list[int]]:
    images, labels = [], []
    for path in files:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(int(y) for y in entry[label_key])
    return np.concatenate(images).transpose(0, 2, 3, 1).copy(), labels


class CIFAR10DataModule(ClassificationDataModule):
    """CIFAR-10 (train split into train/val, official test set for test).

    Args:
        data_dir: Folder that holds (or will hold) ``cifar-10-batches-py``.
        download: Download the archive with torchvision if it is missing (needs network).
        val_split: Fraction of the training set held out for validation; 0 validates on the
            test set.
        image_size: Side the 32x32 images are resized to (32: no resize).
        augment: Random crop with 4-pixel padding and horizontal flip for training.
        seed: Seed of the train/val split.
        batch_size: Images per device and step.
        num_workers: Data-loading worker processes.
        pin_memory: Pin host memory for faster copies to the GPU.
        predict_dir: Folder of images for ``predict``.
    """

    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file, names_key, label_key = "batches.meta", "label_names", "labels"
    torchvision_cls = datasets.CIFAR10
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    num_classes = 10

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        val_split: float = 0.1,
        image_size: int = 32,
        augment: bool = True,
        seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 2,
        pin_memory: bool = False,
        predict_dir: str | None = None,
    ):
        super().__init__(batch_size, num_workers, pin_memory, predict_dir)
        if not 0.0 <= val_split < 1.0:
            raise ValueError(f"data.val_split={val_split} must be in [0, 1)")
        if image_size <= 0:
            raise ValueError(f"data.image_size={image_size} must be > 0")
        self.data_dir = Path(data_dir)
        self.download = download
        self.val_split = val_split
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self.classes = self._read_class_names() if self._present() else []

    def _root(self) -> Path:
        return self.data_dir / self.folder

    def _present(self) -> bool:
        files = (*self.train_files, *self.test_files, self.meta_file)
        return all((self._root() / f).is_file() for f in files)

    def _read_class_names(self) -> list[str]:
        with open(self._root() / self.meta_file, "rb") as f:
            return list(pickle.load(f, encoding="latin1")[self.names_key])

    def prepare_data(self) -> None:
        if self.download and not self._present():
            for train in (True, False):
                self.torchvision_cls(str(self.data_dir), train=train, download=True)

    def _require(self) -> None:
        if not self._present():
            raise FileNotFoundError(
                f"{type(self).__name__}: no dataset at {self._root()} (looked for "
                f"{', '.join((*self.train_files, *self.test_files, self.meta_file))}). "
                "Set data.download: true to fetch it, or data.data_dir to the folder that "
                f"contains {self.folder}/."
            )

    def _transform(self, train: bool) -> Callable:
        steps = []
        if self.image_size != 32:
            steps.append(T.Resize(self.image_size, interpolation=T.InterpolationMode.BICUBIC))
        if train and self.augment:
            pad = max(1, self.image_size // 8)
            steps += [T.RandomCrop(self.image_size, padding=pad), T.RandomHorizontalFlip()]
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)

    def eval_transform(self) -> Callable:
        return T.Compose(
            [
                T.Resize(self.image_size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(self.image_size),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "predict":
            if not self.classes:
                self._require()
            return
        self._require()
        self.classes = self._read_class_names()
        root = self._root()
        test_images, test_labels = _read_batches(
            [root / f for f in self.test_files], self.label_key
        )
        self.test_set = CIFARArrays(test_images, test_labels, self._transform(train=False))
        if stage in ("fit", "validate"):
            images, labels = _read_batches([root / f for f in self.train_files], self.label_key)
            n_val = round(len(labels) * self.val_split)
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
            train = CIFARArrays(images, labels, self._transform(train=True))
            self.train_set = Subset(train, order[n_val:].tolist())
            if n_val:
                val = CIFARArrays(images, labels, self._transform(train=False))
                self.val_set = Subset(val, order[:n_val].tolist())
            else:
                self.val_set = self.test_set


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 with its 100 fine labels; same arguments as :class:`CIFAR10DataModule`."""

    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    meta_file, names_key, label_key = "meta", "fine_label_names", "fine_labels"
    torchvision_cls = datasets.CIFAR100
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    num_classes = 100
