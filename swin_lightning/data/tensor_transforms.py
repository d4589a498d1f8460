"""Decode to tensors and augment on tensors: torchvision's ``decode_image`` and transforms v2
counterparts of timm's PIL recipe (random resized crop, flip, RandAugment, normalise, random
erasing), for ``decode: tensor`` in the ImageFolder and packed data modules.

The loader workers decode, crop, flip and auto-augment, and hand over ``uint8`` crops (a
quarter of float32's bytes between processes); :class:`FinishOnDevice` scales, normalises
and random-erases whole batches on the device, as timm's prefetch loader does.

PIL stays the default: the tensor path is faster per loader worker (``bench``, table 4). It
draws crops, flips and erasing from the same distributions (``tests/test_packed.py`` compares
their statistics) and runs timm's own auto-augment policy and random erasing, so their ops
are exactly timm's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import InterpolationMode, v2

DECODE_CHOICES = ("pil", "tensor")  # "device" too for packed data (JPEGs checked by pack)
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
        return out.permute(2, 0, 1).contiguous()


class ToNormalizedFloat:
    """``uint8`` image of any memory layout -> contiguous ``float32`` ``(C, H, W)``, scaled to
    [0, 1] and normalised by ``mean``/``std``: ``ToDtype`` + ``Normalize`` in one pass.

    Two separate v2 steps on the channels-last tensor that decoding and auto-augment leave
    cost 0.42 ms a 224 crop on one core; one layout-changing cast and two in-place ops, 0.17.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.shift = torch.tensor([255.0 * m for m in mean]).view(-1, 1, 1)
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        out = image.to(torch.float32, memory_format=torch.contiguous_format)
        return out.sub_(self.shift).mul_(self.scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FinishOnDevice:
    """The end of the ``decode: tensor`` recipe, on a batch of ``uint8`` crops on the device:
    scale and normalise (:class:`ToNormalizedFloat`) and, in training, timm's random erasing
    (the PIL recipe's own, per image, in the normalised space).

    Args:
        mean: Normalisation mean.
        std: Normalisation standard deviation.
        re_prob: Random Erasing probability (0: off).
        re_mode: Random Erasing fill ('const', 'rand' or 'pixel').
        re_count: Most Random Erasing regions per image.
    """

    def __init__(self, mean, std, re_prob: float = 0.0, re_mode: str = "pixel", re_count: int = 1):
        from timm.data.random_erasing import RandomErasing

        self.normalize = ToNormalizedFloat(mean, std)
        self.erase = None
        if re_prob > 0:
            self.erase = RandomErasing(re_prob, mode=re_mode, max_count=re_count, device="cpu")

    def __call__(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images  # already finished (the PIL path)
        norm = self.normalize
        if norm.shift.device != images.device:
            norm.shift, norm.scale = norm.shift.to(images.device), norm.scale.to(images.device)
        out = norm(images)
        if train and self.erase is not None:
            self.erase.device = out.device  # where its noise is drawn
            out = self.erase(out)
        return out


def crop_and_flip(
    image_size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip: float,
    interpolation: str,
) -> list[Callable]:
    """timm's RandomResizedCrop and horizontal flip as transforms v2 steps (any device)."""
    mode = _INTERPOLATION.get(interpolation, InterpolationMode.BICUBIC)
    return [
        v2.RandomResizedCrop(image_size, scale=scale, ratio=ratio, interpolation=mode),
        v2.RandomHorizontalFlip(hflip),
    ]


def tensor_train_transform(
    image_size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip: float,
    auto_augment: str | None,
    interpolation: str,
    mean: tuple[float, ...],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Training augmentation of a ``uint8`` image tensor, mirroring timm's ``create_transform``
    up to normalisation (``uint8`` out; :class:`FinishOnDevice` does the rest)."""
    steps = crop_and_flip(image_size, scale, ratio, hflip, interpolation)
    if auto_augment:
        steps.append(TimmAutoAugment(auto_augment, image_size, mean, interpolation))
    return v2.Compose(steps)


def tensor_eval_transform(
    image_size: int, crop_pct: float, interpolation: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Resize to ``image_size / crop_pct`` and centre-crop, as timm's evaluation transform
    (``uint8`` out)."""
    mode = _INTERPOLATION.get(interpolation, InterpolationMode.BICUBIC)
    return v2.Compose(
        [v2.Resize(int(image_size / crop_pct), interpolation=mode), v2.CenterCrop(image_size)]
    )


def device_augment_policy(policy: str | None) -> v2.RandAugment | None:
    """torchvision's RandAugment for a timm ``rand-m<M>[-n<N>]...`` policy, for ``decode:
    device`` (timm's ops need PIL images on the CPU): the same number of ops and magnitude,
    torchvision's op set and no magnitude noise."""
    if not policy:
        return None
    parts = policy.split("-")
    if parts[0] != "rand":
        raise ValueError(
            f"data.auto_augment={policy!r} is not available with data.decode=device (the "
            "device runs torchvision's RandAugment): use a 'rand-m<M>-n<N>' policy, null, or "
            "data.decode=tensor for timm's own policies"
        )
    settings = {p[0]: p[1:] for p in parts[1:] if p[:1] in ("m", "n") and p[1:].isdigit()}
    return v2.RandAugment(num_ops=int(settings.get("n", 2)), magnitude=int(settings.get("m", 9)))


def collate_encoded(samples: list[tuple[torch.Tensor, int]]) -> list:
    """Batch of ``(encoded bytes, label)`` for ``decode: device``: the variable-length byte
    tensors stay a list (decoded together on the device), the labels become a tensor."""
    return [[data for data, _ in samples], torch.tensor([label for _, label in samples])]


class DeviceDecode:
    """``decode: device``: a batch of encoded JPEGs decoded together by torchvision on the
    training device (nvJPEG on a GPU), then cropped, flipped and auto-augmented there, image by
    image; ``uint8`` out, finished by :class:`FinishOnDevice`. Evaluation resizes and
    centre-crops as timm does.
    """

    def __init__(
        self,
        image_size: int,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        hflip: float,
        auto_augment: str | None,
        interpolation: str,
        crop_pct: float,
    ):
        train = crop_and_flip(image_size, scale, ratio, hflip, interpolation)
        augment = device_augment_policy(auto_augment)
        self.train = v2.Compose([*train, *([augment] if augment else [])])
        self.eval = tensor_eval_transform(image_size, crop_pct, interpolation)

    def __call__(self, encoded: list[torch.Tensor], device: torch.device, train: bool):
        jpeg = [i for i, data in enumerate(encoded) if data[:2].tolist() == [0xFF, 0xD8]]
        images: list[torch.Tensor | None] = [None] * len(encoded)
        if jpeg:
            batch = decode_jpeg([encoded[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
            for i, image in zip(jpeg, batch, strict=True):
                images[i] = image
        for i, image in enumerate(images):  # PNG, WebP, ...: torchvision on the CPU
            if image is None:
                images[i] = decode_image(encoded[i], mode=ImageReadMode.RGB).to(device)
        transform = self.train if train else self.eval
        return torch.stack([transform(image) for image in images])
