"""Decode to tensors and augment on tensors: torchvision's ``decode_image`` and transforms v2
counterparts of timm's PIL recipe (random resized crop, flip, RandAugment, normalise, random
erasing), for ``decode: tensor`` in the ImageFolder and packed data modules.

PIL stays the default: the tensor path is faster per loader worker (``bench``, table 4). It
draws crops, flips and erasing from the same distributions (``tests/test_packed.py`` compares
their statistics) and runs timm's own auto-augment policy on the crop, so RandAugment's ops
are exactly timm's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode, v2

DECODE_CHOICES = ("pil", "tensor")
_INTERPOLATION = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "random": InterpolationMode.BICUBIC,  # timm picks per image; v2 has one mode per transform
}


def decode_bytes(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """Encoded JPEG/PNG/... bytes -> ``uint8`` RGB tensor ``(3, H, W)``."""
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_image(buffer, mode=ImageReadMode.RGB)


class TimmAutoAugment:
    """timm's auto-augment policy (``rand-m9-mstd0.5-inc1``, ``augmix-...``, ``original``)
    applied to a ``uint8`` tensor: the same ops and distribution as the PIL recipe.

    timm's ops run on PIL images; the tensor goes there and back (two copies of a 224 crop,
    a fraction of a millisecond), which is faster than torchvision's tensor RandAugment.
    """

    def __init__(self, policy: str, image_size: int, mean: tuple[float, ...], interpolation: str):
        from timm.data.auto_augment import (
            augment_and_mix_transform,
            auto_augment_transform,
            rand_augment_transform,
        )
        from timm.data.transforms import str_to_pil_interp

        hparams: dict = {
            "translate_const": int(image_size * 0.45),
            "img_mean": tuple(min(255, round(255 * x)) for x in mean),
        }
        if interpolation != "random":
            hparams["interpolation"] = str_to_pil_interp(interpolation)
        if policy.startswith("rand"):
            self.augment = rand_augment_transform(policy, hparams)
        elif policy.startswith("augmix"):
            hparams["translate_pct"] = 0.3
            self.augment = augment_and_mix_transform(policy, hparams)
        else:
            self.augment = auto_augment_transform(policy, hparams)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
        out = torch.from_numpy(np.asarray(self.augment(pil), dtype=np.uint8).copy())
        return out.permute(2, 0, 1)


def tensor_train_transform(
    image_size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip: float,
    auto_augment: str | None,
    re_prob: float,
    re_mode: str,
    re_count: int,
    interpolation: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Training augmentation of a ``uint8`` image tensor, mirroring timm's ``create_transform``."""
    mode = _INTERPOLATION.get(interpolation, InterpolationMode.BICUBIC)
    steps: list[Callable] = [
        v2.RandomResizedCrop(image_size, scale=scale, ratio=ratio, interpolation=mode),
        v2.RandomHorizontalFlip(hflip),
    ]
    if auto_augment:
        steps.append(TimmAutoAugment(auto_augment, image_size, mean, interpolation))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if re_prob > 0:
        # timm's 'pixel' / 'rand' fill normal noise in the normalised space, 'const' zeros.
        value = 0 if re_mode == "const" else "random"
        steps += [v2.RandomErasing(re_prob, value=value) for _ in range(max(1, re_count))]
    return v2.Compose(steps)


def tensor_eval_transform(
    image_size: int, crop_pct: float, interpolation: str, mean, std
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Resize to ``image_size / crop_pct`` and centre-crop, as timm's evaluation transform."""
    mode = _INTERPOLATION.get(interpolation, InterpolationMode.BICUBIC)
    return v2.Compose(
        [
            v2.Resize(int(image_size / crop_pct), interpolation=mode),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
