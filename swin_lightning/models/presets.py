"""Named Swin shapes: the paper's T/S/B/L at 224 (window 7) and 384 (window 12), and CIFAR."""

from __future__ import annotations

from typing import Any

from swin_lightning.models.swin import SwinTransformer

_T = {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)}
_S = {"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24)}
_B = {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)}
_L = {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48)}
_AT_384 = {"img_size": 384, "window_size": 12}

PRESETS: dict[str, dict[str, Any]] = {
    "swin_t": {**_T, "img_size": 224, "window_size": 7},
    "swin_s": {**_S, "img_size": 224, "window_size": 7},
    "swin_b": {**_B, "img_size": 224, "window_size": 7},
    "swin_l": {**_L, "img_size": 224, "window_size": 7},
    "swin_t_384": {**_T, **_AT_384},
    "swin_s_384": {**_S, **_AT_384},
    "swin_b_384": {**_B, **_AT_384},
    "swin_l_384": {**_L, **_AT_384},
    # 32x32 input: 2x2 patches give a 16x16 grid, windows of 4 give 4x4 windows in stage 1;
    # stages 3 and 4 (4x4, 2x2) are then a single global window, as the paper's rule says.
    "swin_cifar": {**_T, "img_size": 32, "patch_size": 2, "window_size": 4},
}


def preset_kwargs(name: str) -> dict[str, Any]:
    """Constructor arguments of a named preset (a copy, safe to edit)."""
    if name not in PRESETS:
        raise ValueError(f"unknown Swin preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def create_model(name: str, **overrides: Any) -> SwinTransformer:
    """Build a preset, with any constructor argument overridden (e.g. ``num_classes=10``)."""
    return SwinTransformer(**{**preset_kwargs(name), **overrides})
