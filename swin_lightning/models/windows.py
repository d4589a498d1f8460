"""Window helpers for Swin: partition/reverse, relative positions and the shift mask.

All tensors are channels-last (``B, H, W, C``), the layout the whole model works in.
"""

from __future__ import annotations

import math

import torch

# The value the official implementation adds to logits of token pairs that came from
# different regions of the shifted image; exp(-100) underflows to zero in softmax.
MASK_VALUE = -100.0


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Split ``(B, H, W, C)`` into windows ``(B, nW, wh*ww, C)``; H, W must be multiples."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C).transpose(2, 3)
    return x.reshape(B, (H // wh) * (W // ww), wh * ww, C)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B, nW, wh*ww, C)`` -> ``(B, H, W, C)``."""
    B, _, _, C = windows.shape
    wh, ww = window
    x = windows.view(B, H // wh, W // ww, wh, ww, C).transpose(2, 3)
    return x.reshape(B, H, W, C)


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """``(N, N)`` index into a ``(2wh-1)*(2ww-1)`` bias table for every query/key pair."""
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"))
    coords = coords.flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
    rel[..., 0] += wh - 1
    rel[..., 1] += ww - 1
    return rel[..., 0] * (2 * ww - 1) + rel[..., 1]


def log_spaced_relative_coords(
    window: tuple[int, int], pretrained_window: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """Swin V2's inputs to the continuous position bias MLP: ``(2wh-1, 2ww-1, 2)``.

    Every relative offset ``(dy, dx)`` of a window, scaled so the largest offset of the
    pretraining window (``pretrained_window``; 0: this window) maps to 8, then log-spaced:
    ``sign(t) * log2(1 + |t|) / log2(8)``. Offsets of a larger window then extrapolate
    gently past +-1 instead of far past the range the MLP was trained on. Rows are ordered
    as :func:`relative_position_index` indexes them.
    """
    axes = []
    for size, pretrained in zip(window, pretrained_window, strict=True):
        span = max((pretrained if pretrained > 0 else size) - 1, 1)  # a window of 1: offset 0
        axes.append(torch.arange(-(size - 1), size, dtype=torch.float32) / span * 8)
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    return torch.sign(coords) * torch.log2(coords.abs() + 1.0) / math.log2(8)


def shift_region_ids(
    H: int, W: int, window: tuple[int, int], shift: tuple[int, int]
) -> torch.Tensor:
    """Label every position of the (padded) ``H x W`` grid with the region it belongs to.

    After a cyclic shift by ``-shift`` the bottom/right ``shift`` rows/columns hold tokens
    that were at the opposite border. The grid splits into 3 x 3 regions per axis (the part
    untouched by the shift, the last window's remainder, and the wrapped strip); tokens with
    different labels must not attend to each other.
    """
    ids = torch.zeros(H, W, dtype=torch.long)
    label = 0
    for hs in _axis_slices(window[0], shift[0]):
        for ws in _axis_slices(window[1], shift[1]):
            ids[hs, ws] = label
            label += 1
    return ids


def _axis_slices(window: int, shift: int) -> tuple[slice, ...]:
    if shift == 0:
        return (slice(None),)
    return (slice(0, -window), slice(-window, -shift), slice(-shift, None))


def shift_attention_mask(
    H: int, W: int, window: tuple[int, int], shift: tuple[int, int]
) -> torch.Tensor:
    """Additive mask ``(nW, N, N)``: 0 inside a region, :data:`MASK_VALUE` across regions."""
    ids = shift_region_ids(H, W, window, shift)
    ids = window_partition(ids[None, :, :, None], window)[0, :, :, 0]  # (nW, N)
    different = ids[:, :, None] != ids[:, None, :]
    return torch.zeros(different.shape).masked_fill(different, MASK_VALUE)
