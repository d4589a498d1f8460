"""ImageNet, or any dataset in the ImageFolder layout, with timm's training transforms."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision.datasets import ImageFolder

from swin_lightning.data.base import IMAGE_SUFFIXES, ClassificationDataModule


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
    """

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
    ):
        super().__init__(batch_size, num_workers, pin_memory, predict_dir)
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
        # Read now: num_classes is linked into the model before anything is built.
        self.classes = class_folders(self.root / train_dir)
        self.num_classes = len(self.classes)

    def train_transform(self) -> Callable:
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

    def _split(self, split: str, transform: Callable) -> ImageFolder:
        split_dir = self.root / self.split_dirs[split]
        classes = class_folders(split_dir)
        if classes != list(self.classes):
            only_train = sorted(set(self.classes) - set(classes))
            only_here = sorted(set(classes) - set(self.classes))
            raise ValueError(
                f"class folders of {split_dir} differ from {self.root / self.split_dirs['train']}:"
                f" only in train: {only_train or 'none'}; only in {split}: {only_here or 'none'}"
            )
        return ImageFolder(str(split_dir), transform=transform)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.train_set = self._split("train", self.train_transform())
        if stage in ("fit", "validate"):
            self.val_set = self._split("val", self.eval_transform())
        if stage == "test":
            self.test_set = self._split("test", self.eval_transform())
