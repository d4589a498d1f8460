"""Packed, streamed image data: an ImageFolder tree packed once into ``litdata`` chunks, then
read as a stream (local folder, or ``s3://``/``gs://``/... with a local cache) with exact
mid-epoch resume.

Layout of a packed folder (``python -m swin_lightning pack --root TREE --out DIR``)::

    DIR/train/   litdata chunks + index.json: the encoded image bytes as they were, label, path
    DIR/val/     the same for the validation split
    DIR/meta.json        class names, samples per class and split (written last: a pack
                         without it is unfinished, and ``pack`` resumes it)
    DIR/bad_images.txt   files that could not be decoded (listed, not packed)

Opening a packed split reads its ``index.json`` only: no per-file ``stat``.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import random
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from swin_lightning.data.base import IMAGE_SUFFIXES, ClassificationDataModule
from swin_lightning.data.imagefolder import (
    CORRUPT_IMAGE_ERRORS,
    ImageFolderDataModule,
    class_folders,
)
from swin_lightning.data.tensor_transforms import (
    DECODE_CHOICES,
    DeviceDecode,
    collate_encoded,
    decode_bytes,
)
from swin_lightning.storage import write_text

META = "meta.json"
BAD_LIST = "bad_images.txt"
REMOTE_PREFIXES = ("s3://", "gs://", "azure://", "r2://", "hf://", "local:")


LITDATA_ADVERT = "Create an account on https://lightning.ai/"


class _WithoutAdvert(io.TextIOBase):
    """stdout for litdata's optimize without the account advert it prints on every call (it
    has no switch but ``verbose``, which would take the progress bar too)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        if not text.startswith(LITDATA_ADVERT):
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class PackError(RuntimeError):
    """Packing cannot start or did not produce what the tree holds."""


def _require_litdata():
    try:
        import litdata
    except ImportError as err:  # pragma: no cover - the extra is installed in dev and CI
        raise ImportError(
            "packed data needs litdata: pip install 'swin_lightning[packed]'"
        ) from err
    return litdata


def list_split(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and ``(relative path, label)`` of every image file of one split, sorted."""
    classes = class_folders(split_dir)
    items = []
    for label, name in enumerate(classes):
        for path in sorted((split_dir / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                items.append((str(path.relative_to(split_dir)), label))
    return classes, items


class PackItem:
    """litdata's per-item function: read one file, check it decodes, return its bytes.

    An unreadable image returns None (litdata packs nothing for it) and is appended to a
    per-process list under ``bad_dir``, which :func:`pack_split` merges into the report.
    """

    def __init__(self, split_dir: str, bad_dir: str):
        self.split_dir = split_dir
        self.bad_dir = bad_dir

    def __call__(self, item: tuple[str, int]) -> dict[str, Any] | None:
        rel, label = item
        path = os.path.join(self.split_dir, rel)
        try:
            data = Path(path).read_bytes()
            with Image.open(io.BytesIO(data)) as img:  # decode the bytes read, not the file again
                img.load()
        except CORRUPT_IMAGE_ERRORS as err:
            with open(os.path.join(self.bad_dir, f"{os.getpid()}.txt"), "a") as f:
                f.write(f"{path}\t{type(err).__name__}: {err}\n".replace("\r", " "))
            return None
        return {"image": data, "label": label, "path": rel}


def pack_split(
    split_dir: Path,
    out: Path,
    seed: int,
    num_workers: int,
    chunk_bytes: str,
) -> tuple[list[str], Counter, list[str]]:
    """Pack one split (shuffled by ``seed``) into ``out``; resumes an interrupted pack.

    Returns the class names, the packed samples per class (read back from the chunks) and
    the unreadable files. Raises :class:`PackError` when the counts differ from the tree's.
    """
    litdata = _require_litdata()
    classes, items = list_split(split_dir)
    random.Random(seed).shuffle(items)
    # Lists, not tuples: litdata resumes only when the items equal those of its checkpoint,
    # which it keeps as JSON (a tuple comes back as a list, and would never match).
    inputs = [[rel, label] for rel, label in items]
    checkpoint = out / ".checkpoints" / "config.json"
    if checkpoint.is_file():  # an interrupted pack: resume it with the workers it had
        try:
            num_workers = int(json.loads(checkpoint.read_text())["num_workers"])
        except (ValueError, KeyError, TypeError) as err:
            raise PackError(
                f"{checkpoint} is damaged ({type(err).__name__}: {err}); delete {out} and pack "
                "again"
            ) from err
    bad_dir = out.parent / f".bad_{out.name}"
    bad_dir.mkdir(parents=True, exist_ok=True)
    # litdata sets the process-wide start method; put it back, so DataLoaders started later
    # in this process keep theirs (fork on Linux: workers up in milliseconds, not seconds).
    start_method = multiprocessing.get_start_method(allow_none=True)
    try:
        with contextlib.redirect_stdout(_WithoutAdvert(sys.stdout)):
            litdata.optimize(
                fn=PackItem(str(split_dir), str(bad_dir)),
                inputs=inputs,
                output_dir=str(out),
                chunk_bytes=chunk_bytes,
                num_workers=max(1, num_workers),
                use_checkpoint=True,  # a re-run after a kill continues where workers stopped
                start_method="spawn",
            )
    except ValueError as err:  # litdata: the checkpoint does not fit this tree
        raise PackError(
            f"cannot resume the interrupted pack in {out} ({err}): {split_dir} changed since; "
            f"delete {out} and pack again"
        ) from err
    finally:
        multiprocessing.set_start_method(start_method, force=True)
    if not (out / "index.json").is_file():
        raise PackError(
            f"packing {split_dir} wrote no index to {out}: its worker processes failed (see "
            "above); fix the cause and run pack again"
        )
    bad = sorted(
        {line.split("\t")[0] for f in bad_dir.glob("*.txt") for line in f.read_text().splitlines()}
    )
    packed = Counter(label for label, _ in iter_labels(out))
    expected = Counter(label for rel, label in items if str(split_dir / rel) not in bad)
    if packed != expected:
        missing = {
            classes[k]: expected[k] - packed[k] for k in expected if expected[k] != packed[k]
        }
        raise PackError(
            f"packed {sum(packed.values())} samples of {split_dir} but the tree holds "
            f"{sum(expected.values())} readable images; per class (tree - packed): {missing}. "
            f"Delete {out} and pack again"
        )
    shutil.rmtree(bad_dir, ignore_errors=True)
    return classes, packed, bad


def iter_labels(split: Path):
    """``(label, path)`` of every packed sample of a local split, in stored order."""
    litdata = _require_litdata()
    dataset = litdata.StreamingDataset(str(split))
    for i in range(len(dataset)):
        sample = dataset[i]
        yield int(sample["label"]), sample["path"]


def pack(
    root: str | Path,
    out: str | Path,
    splits: Sequence[str] = ("train", "val"),
    seed: int = 0,
    num_workers: int = 4,
    chunk_bytes: str = "64MB",
) -> dict[str, Any]:
    """Pack the ImageFolder tree ``root`` (``root/<split>/<class>/<image>``) into ``out``.

    Every split must have the train split's classes. Returns (and writes last, as
    ``meta.json``) the classes and the samples per class of each split.
    """
    root, out = Path(root), Path(out)
    present = [s for s in splits if (root / s).is_dir()]
    if not present:
        raise PackError(
            f"{root} has none of the split folders {', '.join(splits)}; expected the "
            "ImageFolder layout root/<split>/<class>/<image>"
        )
    if (out / META).exists():
        meta = json.loads((out / META).read_text())
        asked = {"source": str(root.resolve()), "seed": seed, "splits": sorted(present)}
        held = {"source": meta.get("source"), "seed": meta.get("seed"),
                "splits": sorted(meta.get("splits", {}))}  # fmt: skip
        if held == asked:
            return meta  # already packed and verified: nothing to redo
        raise PackError(
            f"{out} already holds a pack of {held['source']} (seed {held['seed']}, splits "
            f"{', '.join(held['splits'])}), not the one asked for; choose another --out or "
            "delete it"
        )
    first = class_folders(root / present[0])
    for split in present[1:]:  # labels are indices into one list of classes: check first
        classes = class_folders(root / split)
        if classes != first:
            raise PackError(
                f"class folders of {root / split} differ from {root / present[0]}: only in "
                f"{present[0]}: {sorted(set(first) - set(classes)) or 'none'}; only in {split}: "
                f"{sorted(set(classes) - set(first)) or 'none'}"
            )
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"source": str(root.resolve()), "seed": seed, "splits": {}}
    bad_all: list[str] = []
    for split in present:
        classes, counts, bad = pack_split(root / split, out / split, seed, num_workers, chunk_bytes)
        meta["classes"] = classes
        meta["splits"][split] = {
            "samples": sum(counts.values()),
            "per_class": {classes[k]: counts[k] for k in sorted(counts)},
            "bad_images": len(bad),
        }
        bad_all += bad
    write_text(out / BAD_LIST, "".join(f"{p}\n" for p in bad_all))
    write_text(out / META, json.dumps(meta, indent=1))
    return meta


def read_meta(root: str, cache_dir: str | None = None) -> dict[str, Any]:
    """``meta.json`` of a packed folder, local or remote (copied into ``cache_dir`` first)."""
    if not root.startswith(REMOTE_PREFIXES):
        path = Path(root) / META
        if not path.is_file():
            raise FileNotFoundError(
                f"data.root={root} is not a finished pack (no {META}); create it with "
                f"python -m swin_lightning pack --root <ImageFolder tree> --out {root}"
            )
        return json.loads(path.read_text())
    from litdata.streaming.downloader import get_downloader

    local_dir = Path(cache_dir or Path.home() / ".cache" / "swin_lightning" / "packed")
    local_dir.mkdir(parents=True, exist_ok=True)
    local = local_dir / META
    try:
        get_downloader(root, str(local_dir), []).download_file(
            f"{root.rstrip('/')}/{META}", str(local)
        )
    except Exception as err:
        raise FileNotFoundError(f"cannot read {root}/{META} ({type(err).__name__}: {err})") from err
    return json.loads(local.read_text())


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
        litdata = _require_litdata()
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
        litdata = _require_litdata()
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
