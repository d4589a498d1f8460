"""Test-time augmentation: the softmax scores of a few views of each image, averaged
(``model.tta`` of the classifier, and ``analyze``'s side-by-side figures).

- ``flip``: the image and its mirror image (left-right);
- ``flip_zoom``: those two, and both again zoomed in by ``ZOOM`` (resized up, centre crop back
  to the input size): a multi-scale, multi-crop average at the input size the network takes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

TTA = Literal["none", "flip", "flip_zoom"]
TTA_CHOICES = ("none", "flip", "flip_zoom")
ZOOM = 1.15


def zoom(images: torch.Tensor, factor: float = ZOOM) -> torch.Tensor:
    """Resize NCHW ``images`` up by ``factor`` (bilinear) and crop the centre back to size."""
    h, w = images.shape[-2:]
    big = F.interpolate(images, scale_factor=factor, mode="bilinear", align_corners=False)
    top, left = (big.shape[-2] - h) // 2, (big.shape[-1] - w) // 2
    return big[..., top : top + h, left : left + w]


def views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views of ``mode`` (the images themselves first)."""
    if mode not in TTA_CHOICES:
        raise ValueError(f"tta={mode!r} is not one of {', '.join(TTA_CHOICES)}")
    out = [images]
    if mode in ("flip", "flip_zoom"):
        out.append(images.flip(-1))
    if mode == "flip_zoom":
        zoomed = zoom(images)
        out += [zoomed, zoomed.flip(-1)]
    return out


def tta_probs(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
              mode: str) -> torch.Tensor:  # fmt: skip
    """Class probabilities of ``model`` (logits out) averaged over the views of ``mode``."""
    probs = [model(v).softmax(dim=-1) for v in views(images, mode)]
    return torch.stack(probs).mean(dim=0)
