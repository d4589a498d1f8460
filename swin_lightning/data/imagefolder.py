"""ImageNet, or any dataset in the ImageFolder layout, with timm's training transforms."""

from __future__ import annotations

import multiprocessing
import warnings
from collections.abc import Callable
from multiprocessing import context as mp_context
from pathlib import Path

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision.datasets import ImageFolder

from swin_lightning.data.base import IMAGE_SUFFIXES, ClassificationDataModule
from swin_lightning.data.tensor_transforms import (
    DECODE_CHOICES,
    FinishOnDevice,
    decode_bytes,
    tensor_eval_transform,
    tensor_train_transform,
)


def class_folders(split_dir: Path) -> list[str]:
    """Sorted class-folder names of one split; a clear error if it is missing or empty."""
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"dataset folder {split_dir} does not exist; expected the ImageFolder layout "
            "root/train/<class>/<image> and root/val/<class>/<image> (set data.root)"
        )
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(
            f"dataset folder {split_dir} holds no class folders; expected "
            f"{split_dir}/<class>/<image> with images ending in {', '.join(IMAGE_SUFFIXES)}"
        )
    return classes


# What PIL raises for a file it cannot decode: unknown format, truncated or damaged data.
CORRUPT_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_tensor(path: str):
    """Decode an image file with torchvision to a ``uint8`` RGB tensor (``decode: tensor``)."""
    try:
        return decode_bytes(Path(path).read_bytes())
    except RuntimeError as err:  # torchvision's error for data it cannot decode
        raise OSError(str(err)) from err


class CheckedImageFolder(ImageFolder):
    """ImageFolder whose unreadable images raise an error naming the file, or are skipped.

    With ``skip_corrupt``, an unreadable image is replaced by the next readable one of the
    split, and a warning names it with the number of distinct files skipped so far. Which
    files are unreadable is kept in shared memory, so the count covers every DataLoader
    worker process and a bad file is decoded (and reported) once, not every epoch.
    """

    def __init__(
        self,
        root: str,
        transform: Callable,
        skip_corrupt: bool = False,
        loader: Callable | None = None,
    ):
        super().__init__(root, transform=transform, **({"loader": loader} if loader else {}))
        self.skip_corrupt = skip_corrupt
        # Spawn-context shared memory works with forked and spawned workers alike.
        ctx = multiprocessing.get_context("spawn")
        self._bad = ctx.Array("b", len(self.samples)) if skip_corrupt else None
        self._skipped = ctx.Value("i", 0, lock=False) if skip_corrupt else None

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable files skipped so far, over all worker processes."""
        return self._skipped.value if self._skipped is not None else 0

    def __getstate__(self) -> dict:
        # Shared memory travels to spawned workers (forked ones inherit it); multiprocessing
        # refuses it in any other copy, which then counts on its own.
        state = dict(self.__dict__)
        if mp_context.get_spawning_popen() is None:
            state["_bad"] = state["_skipped"] = None
        return state

    def __getitem__(self, index: int):
        n = len(self.samples)
        for offset in range(n):
            i = (index + offset) % n
            if self._bad is not None and self._bad[i]:
                continue
            path, target = self.samples[i]
            try:
                image = self.loader(path)
            except CORRUPT_IMAGE_ERRORS as err:
                if not self.skip_corrupt:
                    raise OSError(
                        f"corrupt or unreadable image {path} ({type(err).__name__}: {err}); "
                        "delete or replace it, or set data.skip_corrupt: true to skip such files"
                    ) from err
                self._mark_bad(i, path, err)
                continue
            return (self.transform(image) if self.transform else image), target
        raise OSError(f"no readable image in {self.root}: every file failed to load")

    def _mark_bad(self, i: int, path: str, err: Exception) -> None:
        if self._bad is None:
            warnings.warn(f"skip_corrupt: skipped unreadable image {path} ({err})", stacklevel=2)
            return
        with self._bad.get_lock():
            if self._bad[i]:
                return
            self._bad[i] = 1
            self._skipped.value += 1
            total = self._skipped.value
        warnings.warn(
            f"skip_corrupt: skipped unreadable image {path} ({type(err).__name__}: {err}); "
            f"{total} of {len(self.samples)} files in {self.root} skipped so far",
            stacklevel=2,
        )


class ImageFolderDataModule(ClassificationDataModule):
    """Images in ``root/train/<class>/*`` and ``root/val/<class>/*`` (ImageNet's layout).

    Training images go through timm's ``create_transform`` (RandomResizedCrop, flip, colour
    jitter, RandAugment, Random Erasing); evaluation images are resized and centre-cropped.

    Args:
        root: Dataset root with one folder per split.
        image_size: Side of the square crops fed to the model.
        train_dir: Training split folder under root.
        val_dir: Validation split folder under root.
        test_dir: Test split folder under root (default: the validation split).
        scale: RandomResizedCrop area range.
        ratio: RandomResizedCrop aspect-ratio range.
        hflip: Probability of a horizontal flip.
        color_jitter: Colour-jitter strength (None: off; unused by timm when auto_augment is set).
        auto_augment: timm auto-augment policy, e.g. 'rand-m9-mstd0.5-inc1' (None: off).
        re_prob: Random Erasing probability.
        re_mode: Random Erasing fill mode ('const', 'rand' or 'pixel').
        re_count: Random Erasing regions per image.
        interpolation: Resize interpolation ('bicubic', 'bilinear', 'random').
        crop_pct: Evaluation centre-crop fraction (resize to image_size / crop_pct first).
        mean: Normalisation mean.
        std: Normalisation standard deviation.
        batch_size: Images per device and step.
        num_workers: Data-loading worker processes.
        pin_memory: Pin host memory for faster copies to the GPU.
        predict_dir: Folder of images for ``predict``.
        skip_corrupt: Skip images that cannot be decoded (each replaced by the next readable
            one, with a warning naming it and the count so far) instead of stopping with an
            error naming the file.
        decode: 'pil' (PIL decode, timm's transforms) or 'tensor' (torchvision decode to a
            tensor, transforms v2 counterparts: faster per loader worker).
    """

    decode_choices: tuple[str, ...] = DECODE_CHOICES

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str | None = None,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float | None = 0.4,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        re_mode: str = "pixel",
        re_count: int = 1,
        interpolation: str = "bicubic",
        crop_pct: float = 0.875,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = False,
        predict_dir: str | None = None,
        skip_corrupt: bool = False,
        decode: str = "pil",
    ):
        super().__init__(batch_size, num_workers, pin_memory, predict_dir)
        if decode not in self.decode_choices:
            raise ValueError(
                f"data.decode={decode!r} is not one of {', '.join(self.decode_choices)}"
            )
        self.decode = decode
        if image_size <= 0:
            raise ValueError(f"data.image_size={image_size} must be > 0")
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"data.crop_pct={crop_pct} must be in (0, 1]")
        self.root = Path(root)
        self.image_size = image_size
        self.split_dirs = {"train": train_dir, "val": val_dir, "test": test_dir or val_dir}
        self.aug = {
            "scale": tuple(scale),
            "ratio": tuple(ratio),
            "hflip": hflip,
            "color_jitter": color_jitter,
            "auto_augment": auto_augment,
            "re_prob": re_prob,
            "re_mode": re_mode,
            "re_count": re_count,
        }
        self.interpolation = interpolation
        self.crop_pct = crop_pct
        self.mean, self.std = tuple(mean), tuple(std)
        self.skip_corrupt = skip_corrupt
        self._finish: FinishOnDevice | None = None
        # Read now: num_classes is linked into the model before anything is built.
        self.classes = self.read_classes()
        self.num_classes = len(self.classes)

    def read_classes(self) -> list[str]:
        """The class names, in label order."""
        return class_folders(self.root / self.split_dirs["train"])

    def train_transform(self) -> Callable:
        if self.decode == "tensor":
            skip = ("color_jitter", "re_prob", "re_mode", "re_count")  # erasing: on the device
            aug = {k: v for k, v in self.aug.items() if k not in skip}
            return tensor_train_transform(
                self.image_size, interpolation=self.interpolation, mean=self.mean, **aug
            )
        return create_transform(
            self.image_size,
            is_training=True,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            **self.aug,
        )

    def eval_transform(self) -> Callable:
        return create_transform(
            self.image_size,
            is_training=False,
            interpolation=self.interpolation if self.interpolation != "random" else "bicubic",
            mean=self.mean,
            std=self.std,
            crop_pct=self.crop_pct,
        )

    def split_eval_transform(self) -> Callable:
        """Evaluation transform of the val/test splits (``eval_transform`` stays PIL: it
        also serves ``predict_dir`` images)."""
        if self.decode == "tensor":
            interpolation = self.interpolation if self.interpolation != "random" else "bicubic"
            return tensor_eval_transform(self.image_size, self.crop_pct, interpolation)
        return self.eval_transform()

    def finish_images(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        """``decode: tensor`` loaders yield ``uint8`` crops: scale, normalise and (training)
        random-erase them here, on the device, a whole batch at a time."""
        if self.decode == "pil":
            return images
        if self._finish is None:
            re = {k: self.aug[k] for k in ("re_prob", "re_mode", "re_count")}
            self._finish = FinishOnDevice(self.mean, self.std, **re)
        return self._finish(images, train)

    def _split(self, split: str, transform: Callable) -> CheckedImageFolder:
        split_dir = self.root / self.split_dirs[split]
        classes = class_folders(split_dir)
        if classes != list(self.classes):
            only_train = sorted(set(self.classes) - set(classes))
            only_here = sorted(set(classes) - set(self.classes))
            raise ValueError(
                f"class folders of {split_dir} differ from {self.root / self.split_dirs['train']}:"
                f" only in train: {only_train or 'none'}; only in {split}: {only_here or 'none'}"
            )
        loader = read_tensor if self.decode == "tensor" else None
        return CheckedImageFolder(str(split_dir), transform, self.skip_corrupt, loader)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.train_set = self._split("train", self.train_transform())
        if stage in ("fit", "validate"):
            self.val_set = self._split("val", self.split_eval_transform())
        if stage == "test":
            self.test_set = self._split("test", self.split_eval_transform())
