"""Swin as a backbone: NCHW feature maps of chosen stages, with timm's ``feature_info``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from swin_lightning.models.swin import SwinTransformer


class SwinFeatures(SwinTransformer):
    """The Swin network without its final norm and head, returning the output of each stage
    in ``out_indices`` as an NCHW map (timm's ``features_only``: the same maps for the same
    weights). Stages after the last one asked for are not built.

    Inputs of any size the windows allow work (windows are padded where the map is not a
    multiple of the window), as a detection or segmentation backbone needs.

    Args:
        out_indices: Stages to return (0 = first; negative counts from the last).
        **kwargs: SwinTransformer's arguments (``num_classes`` is ignored: no head).
    """

    def __init__(self, out_indices: Sequence[int] = (0, 1, 2, 3), **kwargs: Any):
        super().__init__(**{**kwargs, "num_classes": 0})
        stages = len(self.layers)
        wrong = [i for i in out_indices if not -stages <= i < stages]
        if wrong or not out_indices:
            raise ValueError(
                f"out_indices={tuple(out_indices)} must name stages of this {stages}-stage "
                f"network: indices in {-stages}..{stages - 1}"
            )
        self.out_indices = tuple(sorted({i % stages for i in out_indices}))
        self.layers = self.layers[: self.out_indices[-1] + 1]
        del self.norm, self.head, self.head_drop
        from timm.models import FeatureInfo

        embed_dim = self.num_features // 2 ** (stages - 1)
        channels = [embed_dim * 2**i for i in range(len(self.layers))]
        patch = self.patch_embed.patch_size
        self.feature_info = FeatureInfo(
            [
                {"num_chs": c, "reduction": patch * 2**i, "module": f"layers.{i}"}
                for i, c in enumerate(channels)
            ],
            self.out_indices,
        )

    def trim_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A classifier's weights (this project's layout) without what the backbone does
        not have: the final norm, the head and the stages after the last one returned."""
        keep = len(self.layers)

        def kept(key: str) -> bool:
            parts = key.split(".")
            if parts[0] in ("norm", "head"):
                return False
            return not (parts[0] == "layers" and int(parts[1]) >= keep)

        return {k: v for k, v in state.items() if kept(k)}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        x = self._embed(x)
        maps = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i in self.out_indices:
                maps.append(x.permute(0, 3, 1, 2).contiguous())
        return maps
