"""Per-step learning-rate schedules with linear warmup, sized from the trainer.

Every schedule here is stepped once per optimizer step. Lengths are given in epochs (as in
papers' recipes) and converted to steps with ``steps_per_epoch``; ``total_steps`` and
``steps_per_epoch`` are left at -1 in configs and filled in by
:meth:`~swin_lightning.module.SwinClassifier.configure_optimizers` from
``trainer.estimated_stepping_batches``, so they follow max_epochs, limit_train_batches,
gradient accumulation and the number of devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupLR(LambdaLR):
    """Linear warmup from ``warmup_start_factor x lr`` to ``lr``, then a decay (constant here).

    Args:
        optimizer: The optimizer whose learning rates are scheduled.
        warmup_epochs: Warmup length in epochs (fractions allowed).
        warmup_start_factor: Learning rate at step 0 as a fraction of the base rate.
        min_lr: Lowest learning rate the decay reaches (absolute; scaled like the group's
            rate under linear LR scaling and layer-wise LR decay).
        total_steps: Optimizer steps of the whole run; -1: taken from the trainer.
        steps_per_epoch: Optimizer steps per epoch; -1: taken from the trainer.
        lr_scale: Factor the base rates were scaled by (linear LR scaling); None: filled in
            by the module (1.0 when scaling is off).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_epochs: float = 0.0,
        warmup_start_factor: float = 0.001,
        min_lr: float = 0.0,
        total_steps: int = -1,
        steps_per_epoch: int = -1,
        lr_scale: float | None = None,
    ):
        if total_steps < 1 or steps_per_epoch < 1:
            raise ValueError(
                f"{type(self).__name__} needs total_steps and steps_per_epoch >= 1 (got "
                f"{total_steps}, {steps_per_epoch}); they are filled in from the trainer "
                "when the scheduler is built by SwinClassifier"
            )
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={warmup_epochs} must be >= 0")
        if not 0.0 <= warmup_start_factor <= 1.0:
            raise ValueError(f"warmup_start_factor={warmup_start_factor} must be in [0, 1]")
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.warmup_steps = min(round(warmup_epochs * steps_per_epoch), total_steps - 1)
        self.warmup_start_factor = warmup_start_factor
        lr_scale = 1.0 if lr_scale is None else lr_scale
        lambdas = []
        for group in optimizer.param_groups:
            base = group.get("initial_lr", group["lr"])
            # min_lr follows the group the way its rate does (linear and layer-wise scaling)
            floor = min_lr * lr_scale * group.get("lr_scale", 1.0)
            min_factor = min(1.0, floor / base) if base > 0 else 0.0
            lambdas.append(self._factor_fn(min_factor))
        super().__init__(optimizer, lambdas)

    def _factor_fn(self, min_factor: float):
        def factor(step: int) -> float:
            if step < self.warmup_steps:
                start = self.warmup_start_factor
                return start + (1.0 - start) * step / self.warmup_steps
            # progress runs from 0 at the end of warmup to 1 at the last optimizer step
            span = max(1, self.total_steps - 1 - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return min_factor + (1.0 - min_factor) * self.decay(progress, step)

        return factor

    def decay(self, progress: float, step: int) -> float:
        """Decay factor in [0, 1] (1: base rate, 0: min_lr) after warmup."""
        return 1.0


class WarmupCosineLR(WarmupLR):
    """Linear warmup, then half a cosine from the base rate to ``min_lr`` at the last step."""

    def decay(self, progress: float, step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupLinearLR(WarmupLR):
    """Linear warmup, then a straight line from the base rate to ``min_lr`` at the last step."""

    def decay(self, progress: float, step: int) -> float:
        return 1.0 - progress


class WarmupStepLR(WarmupLR):
    """Linear warmup, then multiply by ``gamma`` every ``step_epochs`` epochs (floor: min_lr).

    Args:
        step_epochs: Epochs between two decays.
        gamma: Multiplicative decay.
        **kwargs: Warmup and length arguments of :class:`WarmupLR`.
    """

    def __init__(
        self, optimizer: Optimizer, step_epochs: float = 30.0, gamma: float = 0.1, **kwargs
    ):
        if step_epochs <= 0:
            raise ValueError(f"step_epochs={step_epochs} must be > 0")
        self.step_epochs, self.gamma = step_epochs, gamma
        super().__init__(optimizer, **kwargs)

    def decay(self, progress: float, step: int) -> float:
        epoch = (step - self.warmup_steps) / self.steps_per_epoch
        return self.gamma ** math.floor(epoch / self.step_epochs)


class WarmupMultiStepLR(WarmupLR):
    """Linear warmup, then multiply by ``gamma`` at each milestone epoch (floor: min_lr).

    Args:
        milestones: Epochs (counted from the start of training) at which the rate decays.
        gamma: Multiplicative decay.
        **kwargs: Warmup and length arguments of :class:`WarmupLR`.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        milestones: Sequence[float] = (30.0, 60.0, 90.0),
        gamma: float = 0.1,
        **kwargs,
    ):
        self.milestones, self.gamma = sorted(milestones), gamma
        super().__init__(optimizer, **kwargs)

    def decay(self, progress: float, step: int) -> float:
        epoch = step / self.steps_per_epoch
        return self.gamma ** sum(epoch >= m for m in self.milestones)
