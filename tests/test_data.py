"""Data modules: real on-disk formats, determinism, and clear errors for missing data."""

from __future__ import annotations

import shutil

import pytest
import torch

from swin_lightning.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    EmbeddedShapesDataModule,
    ImageFolderDataModule,
)
from tests.conftest import write_cifar, write_imagefolder


@pytest.mark.parametrize(
    ("cls", "hundred"), [(CIFAR10DataModule, False), (CIFAR100DataModule, True)]
)
def test_cifar_reads_official_pickles(tmp_path, cls, hundred):
    write_cifar(tmp_path, hundred=hundred, n_train=50, n_test=20)
    dm = cls(data_dir=str(tmp_path), val_split=0.2, num_workers=0, batch_size=8)
    assert dm.num_classes == (100 if hundred else 10) and len(dm.classes) == dm.num_classes
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (40, 10, 20)
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and labels.dtype == torch.long


def test_cifar_missing_says_where_and_how(tmp_path):
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "data.download: true" in message


def test_imagefolder_reads_tree_and_keeps_class_names(tmp_path):
    root = write_imagefolder(tmp_path, classes=("b_dog", "a_cat"), per_class=3, fmt="jpg")
    dm = ImageFolderDataModule(str(root), image_size=32, num_workers=0, batch_size=2)
    assert dm.classes == ["a_cat", "b_dog"] and dm.num_classes == 2
    dm.setup("fit")
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 32, 32)
    assert len(dm.val_set) == 6


def test_imagefolder_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="root/train/<class>/<image>"):
        ImageFolderDataModule(str(tmp_path / "missing"))


def test_imagefolder_empty_folder(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no class folders"):
        ImageFolderDataModule(str(tmp_path))


def test_imagefolder_class_mismatch(tmp_path):
    root = write_imagefolder(tmp_path, classes=("cat", "dog"), per_class=1)
    shutil.rmtree(root / "val" / "dog")
    (root / "val" / "owl").mkdir()
    (root / "val" / "cat" / "0.png").rename(root / "val" / "owl" / "0.png")
    shutil.copy(root / "val" / "owl" / "0.png", root / "val" / "cat" / "0.png")
    dm = ImageFolderDataModule(str(root), num_workers=0)
    with pytest.raises(ValueError, match=r"only in train: \['dog'\]; only in val: \['owl'\]"):
        dm.setup("fit")


def test_embedded_is_deterministic_and_seeded():
    def first_batch(seed):
        dm = EmbeddedShapesDataModule(train_size=32, val_size=8, seed=seed, batch_size=32)
        dm.setup("fit")
        return dm.train_set.tensors

    a, b, c = first_batch(0), first_batch(0), first_batch(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert sorted(a[1].bincount().tolist()) == [3, 3, 3, 3, 3, 3, 3, 3, 4, 4]  # balanced


def test_embedded_bad_settings():
    with pytest.raises(ValueError, match=r"data.num_classes=11 must be in \[2, 10\]"):
        EmbeddedShapesDataModule(num_classes=11)
    with pytest.raises(ValueError, match=r"data\.batch_size=0 must be > 0"):
        EmbeddedShapesDataModule(batch_size=0)


def test_paper_randaugment_policy_runs_at_every_magnitude():
    # '-inc1' posterize keeps 4 - 4*level/10 bits: 0 bits at the top magnitude.
    from PIL import Image
    from timm.data import create_transform
    from timm.data.auto_augment import posterize

    img = Image.new("RGB", (32, 32), (200, 100, 50))
    assert posterize(img, 0).getpixel((0, 0)) == (0, 0, 0)
    transform = create_transform(32, is_training=True, auto_augment="rand-m10-n8-inc1")
    for _ in range(20):
        assert transform(img).shape == (3, 32, 32)
