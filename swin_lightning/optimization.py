"""What the project's LightningModules share for training: parameter groups (no weight decay
on norms, biases and position tables; layer-wise LR decay), the optimizer with a schedule
stepped every optimizer step, and the FLOPs that the throughput monitor reads."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import lightning as L
from torch import nn

from swin_lightning.models import count_flops


def weight_decay_groups(
    model: nn.Module, skip_keywords: set[str] | None = None
) -> list[dict[str, Any]]:
    """Split parameters into a decayed group and one with ``weight_decay=0``.

    No decay for norms and biases (every parameter with fewer than 2 dimensions) and for
    parameters whose name contains one of ``skip_keywords`` (relative position bias tables,
    absolute position embeddings).
    """
    from timm.optim import param_groups_weight_decay

    skip = [n for n, _ in model.named_parameters() if any(k in n for k in skip_keywords or ())]
    # timm's split (1-d parameters and biases undecayed, plus the names listed); its groups
    # come no-decay first and either may be missing: here always (decayed, undecayed), the
    # decayed one taking the optimizer's weight_decay.
    groups = param_groups_weight_decay(model, weight_decay=1.0, no_weight_decay_list=skip)
    by_decay = {g["weight_decay"] > 0: g["params"] for g in groups}
    return [{"params": by_decay.get(True, [])},
            {"params": by_decay.get(False, []), "weight_decay": 0.0}]  # fmt: skip


def layer_decay_groups(
    model: nn.Module, layer_decay: float, skip_keywords: set[str] | None = None
) -> list[dict[str, Any]]:
    """Parameter groups for layer-wise LR decay, each with an ``lr_scale`` (timm's grouping).

    Depths come from ``model.group_matcher`` (stem, one layer per block, head last); the
    head's scale is 1 and every layer below gets ``layer_decay`` times the one above it.
    Weight decay is split as in :func:`weight_decay_groups`: decayed groups take the
    optimizer's ``weight_decay``, the others 0.
    """
    from timm.optim import param_groups_layer_decay

    patterns = [f"*{k}*" for k in skip_keywords or ()]
    groups = param_groups_layer_decay(
        model, weight_decay=1.0, no_weight_decay_list=patterns, layer_decay=layer_decay
    )
    for group in groups:
        if group["weight_decay"] > 0:  # decayed: leave the rate to the optimizer's setting
            del group["weight_decay"]
    return groups


def _unset_arguments(factory: Callable, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` the factory takes and its config left unset (-1 or None).

    jsonargparse hands callables over as ``functools.partial`` objects holding every resolved
    argument (inherited ones included), so their keywords are the source of truth.
    """
    if isinstance(factory, functools.partial):
        given = factory.keywords
        return [n for n in names if n in given and given[n] in (-1, None)]
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return []
    return [n for n in names if n in params and params[n].default in (-1, None)]


def set_flops(module: L.LightningModule, stage: str) -> None:
    """``forward_flops`` of the network for one image and ``flops_per_batch``, which
    ThroughputMonitor reads to log FLOP/s (a backward costs about twice the forward)."""
    net = module.net
    module.forward_flops = count_flops(net, (net.patch_embed.in_chans, *net.img_size))
    batch_size = getattr(module.trainer.datamodule, "batch_size", 1)
    module.flops_per_batch = (3 if stage == "fit" else 1) * module.forward_flops * batch_size


class StepScheduledOptimization:
    """``configure_optimizers`` for the project's LightningModules: the optimizer over
    ``parameter_groups()``, optional linear LR scaling, and an LR schedule stepped every
    optimizer step with its ``total_steps`` and ``steps_per_epoch`` filled in from the
    trainer. Expects ``optimizer_factory``, ``scheduler_factory`` and the hyperparameter
    ``lr_scale_batch_size``."""

    def parameter_groups(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def lr_scale(self) -> float:
        """Factor for linear LR scaling: global batch / lr_scale_batch_size (1 if off)."""
        base = self.hparams.lr_scale_batch_size
        if base is None:
            return 1.0
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if batch_size is None:
            raise ValueError("lr_scale_batch_size needs a data module with a batch_size")
        trainer = self.trainer
        global_batch = batch_size * trainer.world_size * trainer.accumulate_grad_batches
        return global_batch / base

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameter_groups())
        scale = self.lr_scale()
        # Scaled before the schedule is built: its factors multiply each group's initial lr.
        for group in optimizer.param_groups:
            group["lr"] *= scale * group.get("lr_scale", 1.0)
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        batches = self.trainer.num_training_batches
        accumulate = self.trainer.accumulate_grad_batches
        steps_per_epoch = max(1, -(-int(batches) // accumulate)) if batches != float("inf") else 1
        context = {
            "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "lr_scale": scale,
        }
        unset = _unset_arguments(self.scheduler_factory, tuple(context))
        scheduler = self.scheduler_factory(optimizer, **{k: context[k] for k in unset})
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
