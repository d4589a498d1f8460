"""``python -m swin_lightning.samples DIR``: write embedded-dataset images as PNG files.

Handy for trying ``predict`` without any dataset: the files are named ``<n>_<class>.png``.
With ``--imagefolder`` they form an ImageFolder tree (``DIR/{train,val}/<class>/<n>.png``)
for trying the ImageFolder data module or ``pack`` offline.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from torchvision.utils import save_image

from swin_lightning.data.embedded import SHAPES, draw_shapes


def export_pngs(
    out_dir: str | Path, count: int = 20, seed: int = 12345, size: int = 32
) -> list[Path]:
    """Draw ``count`` shapes (all classes, seeded) and save them as PNGs in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = draw_shapes(count, len(SHAPES), size, seed, noise=0.1)
    paths = []
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        paths.append(out / f"{i:03d}_{SHAPES[int(label)]}.png")
        save_image(img, paths[-1])
    return paths


def export_imagefolder(
    out_dir: str | Path, count: int = 200, seed: int = 12345, val_fraction: float = 0.2
) -> dict[str, int]:
    """Draw ``count`` shapes into ``out_dir/{train,val}/<class>/<n>.png``: of each class,
    ``val_fraction`` of its images (at least one) go to val. Returns the images per split."""
    out = Path(out_dir)
    images, labels = draw_shapes(count, len(SHAPES), 32, seed, noise=0.1)
    per_class = Counter(int(label) for label in labels)
    seen: Counter = Counter()
    written = {"train": 0, "val": 0}
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        label = int(label)
        seen[label] += 1
        split = "val" if seen[label] <= max(1, round(per_class[label] * val_fraction)) else "train"
        folder = out / split / SHAPES[label]
        folder.mkdir(parents=True, exist_ok=True)
        save_image(img, folder / f"{i:05d}.png")
        written[split] += 1
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the PNGs to")
    parser.add_argument("--count", type=int, default=20, help="number of images")
    parser.add_argument("--seed", type=int, default=12345, help="generator seed")
    parser.add_argument(
        "--imagefolder", action="store_true", help="write DIR/{train,val}/<class>/*.png (20%% val)"
    )
    args = parser.parse_args(argv)
    if args.imagefolder:
        written = export_imagefolder(args.out_dir, args.count, args.seed)
        print(f"wrote {written['train']} train and {written['val']} val images to {args.out_dir}")
        return
    paths = export_pngs(args.out_dir, args.count, args.seed)
    print(f"wrote {len(paths)} images to {args.out_dir}")


if __name__ == "__main__":
    main()
