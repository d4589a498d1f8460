"""The classifier's former module path, kept so ``swin_lightning.module.SwinClassifier`` in
users' configs and imports keeps working: the LightningModule is in
:mod:`swin_lightning.classifier`, the shared training pieces in
:mod:`swin_lightning.optimization`."""

from swin_lightning.classifier import SwinClassifier
from swin_lightning.optimization import (
    StepScheduledOptimization,
    layer_decay_groups,
    set_flops,
    weight_decay_groups,
)

__all__ = [
    "StepScheduledOptimization",
    "SwinClassifier",
    "layer_decay_groups",
    "set_flops",
    "weight_decay_groups",
]
