"""``python -m swin_lightning verify --root DIR``: check an ImageFolder tree before training.

    python -m swin_lightning verify --root data/mydata [--splits train val test]
        [--fix_list bad.txt]

It reads every file of ``DIR/<split>/<class>/`` and lists, one line each: zero-byte files,
files that are not images, images that fail to decode or are cut short, images in a mode other
than RGB (CMYK, greyscale, palette, alpha: they are converted at load, often not as meant),
files whose content appears in two splits (a test image that is also a training image), and
classes missing from a split. The class balance of each split is printed. Exit 1 when any
problem was found (``--fix_list`` writes the files to move away, one path a line; nothing is
ever deleted), 0 when the tree is clean.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from swin_lightning.data.base import IMAGE_SUFFIXES
from swin_lightning.storage import WriteError, write_text

DEFAULT_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Problem:
    """One thing wrong in the tree: the file (or class folder), what kind, and details."""

    path: Path
    kind: str  # empty, not_image, corrupt, truncated, mode, duplicate, missing_class
    detail: str

    def line(self) -> str:
        return f"{self.kind}: {self.path}: {self.detail}"


def check_image(path: Path, data: bytes) -> Problem | None:
    """The problem of one image file (its bytes ``data``), or None when it decodes fully as
    RGB."""
    if not data:
        return Problem(path, "empty", "zero bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            mode = image.mode
            image.load()  # decodes every pixel: a file cut short fails here
    except Image.UnidentifiedImageError:
        return Problem(path, "not_image", "not an image PIL can identify")
    except OSError as err:
        kind = "truncated" if "truncated" in str(err).lower() else "corrupt"
        return Problem(path, kind, str(err))
    except (SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return Problem(path, "corrupt", f"{type(err).__name__}: {err}")
    if mode != "RGB":
        return Problem(path, "mode", f"mode {mode}, not RGB (converted at load)")
    return None


@dataclass
class TreeReport:
    """What :func:`verify_tree` found."""

    problems: list[Problem]
    counts: dict[str, Counter]  # split -> class -> files


def verify_tree(root: str | Path, splits: tuple[str, ...] = DEFAULT_SPLITS) -> TreeReport:
    """Check every file of ``root/<split>/<class>/`` for the splits that exist."""
    root = Path(root)
    present = [s for s in splits if (root / s).is_dir()]
    if not present:
        raise FileNotFoundError(f"{root} has none of the split folders {', '.join(splits)}: "
                                "expected root/<split>/<class>/<image>")  # fmt: skip
    problems: list[Problem] = []
    counts: dict[str, Counter] = {}
    first_seen: dict[str, Path] = {}
    classes: dict[str, set[str]] = {}
    for split in present:
        classes[split] = {d.name for d in (root / split).iterdir() if d.is_dir()}
        counts[split] = Counter()
        for path in sorted((root / split).rglob("*")):
            if not path.is_file():
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                problems.append(Problem(path, "not_image", f"suffix {path.suffix or '(none)'!r} "
                                        f"is not one of {', '.join(IMAGE_SUFFIXES)}"))  # fmt: skip
                continue
            counts[split][path.relative_to(root / split).parts[0]] += 1
            data = path.read_bytes()  # read once: decoded and hashed
            problem = check_image(path, data)
            if problem is not None:
                problems.append(problem)
            if data:
                digest = hashlib.sha256(data).hexdigest()
                other = first_seen.setdefault(digest, path)
                if other != path and other.relative_to(root).parts[0] != split:
                    problems.append(Problem(path, "duplicate", f"same content as {other}"))
    every = set().union(*classes.values())
    for split in present:
        for name in sorted(every - classes[split]):
            problems.append(Problem(root / split / name, "missing_class",
                                    f"class {name!r} has no folder in {split}"))  # fmt: skip
        for name in sorted(classes[split]):
            if counts[split][name] == 0:
                problems.append(Problem(root / split / name, "missing_class",
                                        f"class {name!r} has no images in {split}"))  # fmt: skip
    return TreeReport(problems, counts)


def balance_lines(counts: dict[str, Counter]) -> list[str]:
    """Per split: images, classes, and the smallest and largest class."""
    lines = []
    for split, per_class in counts.items():
        if not per_class:
            lines.append(f"{split}: no images")
            continue
        small, large = min(per_class.items(), key=lambda kv: kv[1]), per_class.most_common(1)[0]
        lines.append(f"{split}: {sum(per_class.values())} images in {len(per_class)} classes; "
                     f"smallest {small[0]} ({small[1]}), largest {large[0]} ({large[1]})")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swin_lightning verify",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--root", required=True, help="the ImageFolder root (DIR/<split>/<class>/)")
    parser.add_argument("--splits", nargs="+", default=list(DEFAULT_SPLITS))
    parser.add_argument("--fix_list", default=None,
                        help="write the paths of the bad files here (one a line) to move away")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        report = verify_tree(args.root, tuple(args.splits))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in balance_lines(report.counts):
        print(f"[verify] {line}")
    for problem in report.problems:
        print(problem.line())
    if args.fix_list:
        files = sorted({str(p.path) for p in report.problems if p.kind != "missing_class"})
        try:
            write_text(Path(args.fix_list), "".join(f"{f}\n" for f in files))
        except WriteError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"[verify] {len(files)} files listed in {args.fix_list} (nothing was moved)")
    if report.problems:
        kinds = Counter(p.kind for p in report.problems)
        shown = ", ".join(f"{n} {k}" for k, n in kinds.most_common())
        print(f"[verify] {len(report.problems)} problems ({shown})", file=sys.stderr)
        return 1
    print("[verify] clean: every file decodes as RGB, no duplicates across splits")
    return 0
