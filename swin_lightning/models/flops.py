"""FLOP counting with :mod:`torch.utils.flop_counter`.

Convention: ``torch.utils.flop_counter`` counts a multiply-add as 2 FLOPs. The Swin paper
(like most vision papers and timm's tables) reports multiply-adds and calls them FLOPs, so
:func:`count_macs` halves the counter's total; 4.5 G for Swin-T at 224 is 4.5 G MACs.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def _eager():
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()


def count_flops(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Forward FLOPs (multiply-add = 2) of ``model`` on one input of ``input_size`` (C, H, W)."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
        # The fused CPU attention kernel has no FLOP formula registered, so it would be
        # silently skipped; the math backend decomposes attention into counted matmuls.
        # A compiled network (model.compile) is counted in eager mode: the same operations.
        with (
            _eager(),
            FlopCounterMode(display=False) as counter,
            torch.no_grad(),
            sdpa_kernel(SDPBackend.MATH),
        ):
            model(x)
        return counter.get_total_flops()
    finally:
        model.train(was_training)


def count_macs(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Forward multiply-adds per image: the unit the Swin paper reports as "FLOPs"."""
    return count_flops(model, input_size) // 2
