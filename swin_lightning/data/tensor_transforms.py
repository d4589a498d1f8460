"""Decode to tensors and augment on tensors: torchvision's ``decode_image`` and transforms v2
counterparts of timm's PIL recipe (random resized crop, flip, RandAugment, normalise, random
erasing), for ``decode: tensor`` in the ImageFolder and packed data modules.

PIL stays the default: the tensor path is faster per loader worker (``bench``, table 4) and
draws crops, flips and erasing from the same distributions (``tests/test_packed.py`` compares
their statistics). RandAugment is torchvision's (``num_ops=2``, ``magnitude`` from timm's
``rand-mN`` policy string), not timm's exact op list.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
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


def randaugment_magnitude(policy: str) -> int:
    """The magnitude of a timm RandAugment policy string ('rand-m9-mstd0.5-inc1' -> 9)."""
    match = re.search(r"(?:^|-)m(\d+)(?:-|$)", policy)
    if not policy.startswith("rand") or match is None:
        raise ValueError(
            f"data.auto_augment={policy!r}: decode: tensor supports RandAugment policies "
            "'rand-mN[-...]' (or null); use decode: pil for timm's other policies"
        )
    return int(match.group(1))


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
        magnitude = randaugment_magnitude(auto_augment)
        # Rotations and shears of tensors take nearest or bilinear only (timm's PIL ops draw
        # bilinear or bicubic).
        rand = v2.RandAugment(
            num_ops=2, magnitude=magnitude, interpolation=InterpolationMode.BILINEAR
        )
        steps.append(rand)
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
