"""Packing an ImageFolder tree into ``litdata`` chunks once (the ``pack`` command): each
readable image's encoded bytes as they were, its label and path; unreadable files listed, not
packed; a killed pack resumes (:mod:`swin_lightning.data.pack_format` has the layout)."""

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from swin_lightning.data.base import IMAGE_SUFFIXES
from swin_lightning.data.imagefolder import (
    CORRUPT_IMAGE_ERRORS,
    class_folders,
)
from swin_lightning.data.pack_format import BAD_LIST, META, PackError, require_litdata
from swin_lightning.storage import write_text

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
    litdata = require_litdata()
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
    log = out.parent / f".pack_{out.name}.log"
    if (out / "index.json").is_file() and not checkpoint.is_file():
        return _verified(split_dir, out, classes, items, bad_dir, log)  # packed earlier
    # litdata sets the process-wide start method; put it back, so DataLoaders started later
    # in this process keep theirs (fork on Linux: workers up in milliseconds, not seconds).
    start_method = multiprocessing.get_start_method(allow_none=True)
    try:
        with contextlib.redirect_stdout(_WithoutAdvert(sys.stdout)), _workers_stderr_to(log):
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
    except RuntimeError as err:  # litdata: a packing process failed (its error as text)
        raise _failed_pack(err, split_dir, out, bad_dir, log) from None
    finally:
        multiprocessing.set_start_method(start_method, force=True)
    if (out / "index.json").is_file():
        log.unlink(missing_ok=True)
    return _verified(split_dir, out, classes, items, bad_dir, log)


def _verified(
    split_dir: Path,
    out: Path,
    classes: list[str],
    items: list[tuple[str, int]],
    bad_dir: Path,
    log: Path,
) -> tuple[list[str], Counter, list[str]]:
    """The packed split read back and checked against the tree (per class)."""
    if not (out / "index.json").is_file():
        raise PackError(
            f"packing {split_dir} wrote no index to {out}: its packing processes failed (see "
            f"{log}); fix the cause and run pack again"
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
    return classes, packed, bad  # bad_dir stays until the whole pack is written (pack())


@contextlib.contextmanager
def _workers_stderr_to(log: Path):
    """The packing processes (started while inside) write their stderr to ``log``; this
    process keeps its own (the progress bar). A failing worker's traceback lands in the log,
    and the command says what happened in one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(log, "ab") as f:
            os.dup2(f.fileno(), 2)
    except OSError:  # no room even for the log: the workers keep this stderr
        os.close(saved)
        yield
        return
    own = sys.stderr
    # ``saved`` stays open after the block (one descriptor per split): a progress bar may
    # still write to this stream, and a stream owning it would close a reused number later.
    sys.stderr = open(saved, "w", buffering=1, closefd=False)  # noqa: SIM115
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = own
        os.dup2(saved, 2)


def _failed_pack(err: RuntimeError, split_dir: Path, out: Path, bad_dir: Path, log: Path):
    """The :class:`PackError` of a packing process that failed. A full disk removes the
    split's partial chunks: litdata's checkpoint can count items whose chunk was never
    written, so resuming would pack some twice; the re-run packs the split anew."""
    text = str(err)
    last = next((ln.strip() for ln in reversed(text.splitlines()) if "Error" in ln), text[:200])
    full = "No space left on device" in text or shutil.disk_usage(out.parent).free < 2**20
    if not full:
        return PackError(f"packing {split_dir} failed in a packing process ({last}; its "
                         f"output: {log}); fix the cause and run pack again")  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(bad_dir, ignore_errors=True)
    log.unlink(missing_ok=True)
    need = sum(p.stat().st_size for p in split_dir.rglob("*") if p.is_file()) / 2**20
    return PackError(
        f"the disk of {out.parent} filled up while packing {split_dir} ([Errno 28] No space "
        f"left on device): its partial chunks were removed (a pack cut by a full disk cannot "
        f"be resumed safely); free about {need:.0f} MiB there (the split's images) and run the "
        "same pack command again"
    )


def iter_labels(split: Path):
    """``(label, path)`` of every packed sample of a local split, in stored order."""
    litdata = require_litdata()
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
    for split in present:  # a re-run before meta.json re-checks a packed split with them
        shutil.rmtree(out / f".bad_{split}", ignore_errors=True)
    return meta
