"""``python -m swin_lightning pack``: pack an ImageFolder tree into litdata chunks, once.

Shuffles each split (by ``--seed``), writes it with several processes, resumes an interrupted
pack when run again with the same arguments, checks at the end that every readable image of
the tree was packed (per class), and lists the images it could not decode.
"""

from __future__ import annotations

import argparse
import json
import sys

from swin_lightning.storage import WriteError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m swin_lightning pack", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--root", required=True, help="ImageFolder tree: root/<split>/<class>/*")
    parser.add_argument("--out", required=True, help="output folder (local; copy it to an "
                        "object store afterwards for s3:// or gs:// roots)")  # fmt: skip
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="split folders")
    parser.add_argument("--seed", type=int, default=0, help="seed of the packing order")
    parser.add_argument("--num_workers", type=int, default=4, help="packing processes")
    parser.add_argument("--chunk_bytes", default="64MB", help="size of one chunk file")
    args = parser.parse_args(argv)
    if args.num_workers < 1:
        parser.error(f"--num_workers={args.num_workers} must be >= 1")
    from swin_lightning.data.pack_format import BAD_LIST, META, PackError
    from swin_lightning.data.packer import pack

    try:
        meta = pack(args.root, args.out, args.splits, args.seed, args.num_workers, args.chunk_bytes)
    except (PackError, FileNotFoundError, WriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for split, info in meta["splits"].items():
        bad = f", {info['bad_images']} unreadable (listed in {args.out}/{BAD_LIST})"
        print(f"{split}: {info['samples']} images in {len(meta['classes'])} classes packed"
              f"{bad if info['bad_images'] else ''}")  # fmt: skip
    print(f"wrote {args.out}/{META}: {json.dumps({'classes': len(meta['classes'])})}")
    return 0
