"""Named Swin shapes: the paper's T/S/B/L at 224 (window 7) and 384 (window 12), CIFAR, and
Swin V2's T/S/B at 256 (window 8 and 16) with B/L's window-transfer variants (12 -> 16, 24),
and Swin-MLP's T (C24, C12, C6 at 256, window 8) and B (224, window 7)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from swin_lightning.models.swin import SwinTransformer

_T = {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)}
_S = {"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24)}
_B = {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)}
_L = {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48)}
_AT_384 = {"img_size": 384, "window_size": 12}
# Every Swin V2 switch at its V2 value (see swin_lightning.models.swin).
_V2 = {"block_norm": "post", "attention": "cosine", "pos_embed": "cpb", "merge_norm": "post"}
# Weights pretrained at 192 px / window 12 (stage 4: a global 6x6 window), fine-tuned larger.
_FROM_W12 = {"pretrained_window_size": (12, 12, 12, 6)}
_IN22K = {"num_classes": 21841}
_MLP = {
    "mixer": "mlp",
    "pos_embed": "none",
}  # the window-12 models are ImageNet-22K pretraining models

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
    # Swin V2 (timm: swinv2_{tiny,small,base}_window{8,16}_256, swinv2_{base,large}_window12*).
    "swinv2_t": {**_T, **_V2, "img_size": 256, "window_size": 8},
    "swinv2_t_w16": {**_T, **_V2, "img_size": 256, "window_size": 16},
    "swinv2_s": {**_S, **_V2, "img_size": 256, "window_size": 8},
    "swinv2_s_w16": {**_S, **_V2, "img_size": 256, "window_size": 16},
    "swinv2_b": {**_B, **_V2, "img_size": 256, "window_size": 8},
    "swinv2_b_w16": {**_B, **_V2, "img_size": 256, "window_size": 16},
    "swinv2_b_w12": {**_B, **_V2, **_IN22K, "img_size": 192, "window_size": 12},
    "swinv2_b_w12to16": {**_B, **_V2, **_FROM_W12, "img_size": 256, "window_size": 16},
    "swinv2_b_w12to24": {**_B, **_V2, **_FROM_W12, "img_size": 384, "window_size": 24},
    "swinv2_l_w12": {**_L, **_V2, **_IN22K, "img_size": 192, "window_size": 12},
    "swinv2_l_w12to16": {**_L, **_V2, **_FROM_W12, "img_size": 256, "window_size": 16},
    "swinv2_l_w12to24": {**_L, **_V2, **_FROM_W12, "img_size": 384, "window_size": 24},
    "swinv2_cifar": {**_T, **_V2, "img_size": 32, "patch_size": 2, "window_size": 4},
    # Swin-MLP (the official code's swin_mlp_*): a spatial MLP in the same shifted windows;
    # c24/c12/c6: 24, 12 or 6 channels per head; swin_mlp_t is c24 (configs/models/swin_mlp_t.yaml).
    "swin_mlp_t_c24": {
        **_T,
        **_MLP,
        "num_heads": (4, 8, 16, 32),
        "img_size": 256,
        "window_size": 8,
    },
    "swin_mlp_t_c12": {
        **_T,
        **_MLP,
        "num_heads": (8, 16, 32, 64),
        "img_size": 256,
        "window_size": 8,
    },
    "swin_mlp_t_c6": {
        **_T,
        **_MLP,
        "num_heads": (16, 32, 64, 128),
        "img_size": 256,
        "window_size": 8,
    },
    "swin_mlp_t": {**_T, **_MLP, "num_heads": (4, 8, 16, 32), "img_size": 256, "window_size": 8},
    "swin_mlp_b": {**_B, **_MLP, "num_heads": (4, 8, 16, 32), "img_size": 224, "window_size": 7},
}


def preset_kwargs(name: str) -> dict[str, Any]:
    """Constructor arguments of a named preset (a copy, safe to edit)."""
    if name not in PRESETS:
        raise ValueError(f"unknown Swin preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def create_model(
    name: str,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    **overrides: Any,
) -> SwinTransformer:
    """Build a preset, with any constructor argument overridden (e.g. ``num_classes=10``).

    ``features_only=True`` gives the backbone (:class:`SwinFeatures`): a list of NCHW maps,
    one per stage in ``out_indices``, described by ``model.feature_info`` as in timm.
    """
    kwargs = {**preset_kwargs(name), **overrides}
    if features_only:
        from swin_lightning.models.features import SwinFeatures

        return SwinFeatures(out_indices=out_indices, **kwargs)
    return SwinTransformer(**kwargs)
