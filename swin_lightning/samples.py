"""``python -m swin_lightning.samples DIR``: write embedded-dataset images as PNG files.

Handy for trying ``predict`` without any dataset: the files are named ``<n>_<class>.png``.
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the PNGs to")
    parser.add_argument("--count", type=int, default=20, help="number of images")
    parser.add_argument("--seed", type=int, default=12345, help="generator seed")
    args = parser.parse_args(argv)
    paths = export_pngs(args.out_dir, args.count, args.seed)
    print(f"wrote {len(paths)} images to {args.out_dir}")


if __name__ == "__main__":
    main()
