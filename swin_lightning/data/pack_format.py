"""The format of a packed folder, shared by the packer and the streaming data module.

Layout of a packed folder (``python -m swin_lightning pack --root TREE --out DIR``)::

    DIR/train/   litdata chunks + index.json: the encoded image bytes as they were, label, path
    DIR/val/     the same for the validation split
    DIR/meta.json        class names, samples per class and split (written last: a pack
                         without it is unfinished, and ``pack`` resumes it)
    DIR/bad_images.txt   files that could not be decoded (listed, not packed)

Opening a packed split reads its ``index.json`` only: no per-file ``stat``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

META = "meta.json"
BAD_LIST = "bad_images.txt"
REMOTE_PREFIXES = ("s3://", "gs://", "azure://", "r2://", "hf://", "local:")


class PackError(RuntimeError):
    """Packing cannot start or did not produce what the tree holds."""


def require_litdata():
    try:
        import litdata
    except ImportError as err:  # pragma: no cover - the extra is installed in dev and CI
        raise ImportError(
            "packed data needs litdata: pip install 'swin_lightning[packed]'"
        ) from err
    return litdata


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
