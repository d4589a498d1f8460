"""Data modules: CIFAR-10/100, ImageFolder/ImageNet (loose files or packed and streamed) and
an embedded procedural dataset."""

from swin_lightning.data.base import ClassificationDataModule, ImageListDataset
from swin_lightning.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from swin_lightning.data.embedded import EmbeddedShapesDataModule, WindowPairsDataModule
from swin_lightning.data.imagefolder import ImageFolderDataModule
from swin_lightning.data.packed import PackedDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ClassificationDataModule",
    "EmbeddedShapesDataModule",
    "ImageFolderDataModule",
    "ImageListDataset",
    "PackedDataModule",
    "WindowPairsDataModule",
]
