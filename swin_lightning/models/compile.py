"""``torch.compile`` for the Swin network: whole, or block by block (regional), in place."""

from __future__ import annotations

import torch
from torch import nn

from swin_lightning.models.swin import SwinBlock

COMPILE_CHOICES = ("none", "full", "regional")


def compile_network(
    net: nn.Module,
    how: str = "full",
    mode: str = "default",
    dynamic: bool | None = None,
    backend: str = "inductor",
) -> None:
    """``torch.compile`` a Swin in place: 'full' (one graph), 'regional' (every Swin block
    alone) or 'none'. In place (``nn.Module.compile``), so no ``_orig_mod.`` prefix reaches
    the state dict."""
    if how not in COMPILE_CHOICES:
        raise ValueError(f"model.compile={how!r} is not one of {', '.join(COMPILE_CHOICES)}")
    if how == "none":
        return
    if dynamic is None and how == "regional":
        # Each block shape is its own graph anyway; torch's automatic dynamic shapes would
        # retrace the second shape symbolically (10x slower to compile, and slower code).
        dynamic = False
    options = {"mode": None if mode == "default" else mode, "dynamic": dynamic, "backend": backend}
    if how == "full":
        net.compile(**options)
        return
    blocks = [m for m in net.modules() if isinstance(m, SwinBlock)]
    # Blocks share one forward, so dynamo keeps one entry per distinct block shape (stage
    # resolution, window, shift) and mode (train / eval): allow that many, or the blocks
    # past dynamo's default limit of 8 would silently run eagerly.
    kinds = {
        (b.input_resolution, b.window_size, b.shift_size, b.norm1.normalized_shape) for b in blocks
    }
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 2 * len(kinds))
    for block in blocks:
        block.compile(**options)
