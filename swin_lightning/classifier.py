"""The classification LightningModule: a Swin classifier with its loss (label smoothing,
Mixup/CutMix), top-1/top-5 metrics, optimizer and LR schedule."""

from __future__ import annotations

import functools
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from swin_lightning.models import SwinTransformer, compile_network, load_pretrained
from swin_lightning.models.net_spec import SelfContainedCheckpoint
from swin_lightning.models.pretrained import LoadReport, shape_mismatches
from swin_lightning.optimization import (
    StepScheduledOptimization,
    layer_decay_groups,
    set_flops,
    weight_decay_groups,
)
from swin_lightning.tta import TTA, TTA_CHOICES, tta_probs

STAGES = ("train", "val", "test")


class SwinClassifier(SelfContainedCheckpoint, StepScheduledOptimization, L.LightningModule):
    """Image classification with a Swin Transformer.

    Args:
        net: The Swin Transformer; its constructor arguments are the YAML keys under
            ``model.net`` (``img_size`` and ``num_classes`` come from the data module).
        optimizer: Optimizer class and arguments (AdamW by default). Weight decay is not
            applied to norms, biases and position tables.
        lr_scheduler: Schedule stepped every optimizer step, e.g.
            ``swin_lightning.schedules.WarmupCosineLR``; its ``total_steps`` and
            ``steps_per_epoch`` are filled in from the trainer. None: constant rate.
        label_smoothing: Label smoothing of the cross-entropy loss (also of Mixup targets).
        mixup_alpha: Mixup alpha; > 0 enables Mixup (timm) and the soft-target loss.
        cutmix_alpha: CutMix alpha; > 0 enables CutMix (timm).
        mixup_prob: Probability of applying Mixup or CutMix to a batch.
        mixup_switch_prob: Probability of CutMix instead of Mixup when both are enabled.
        mixup_mode: Mix per 'batch', 'pair' or 'elem'.
        lr_scale_batch_size: If set, linear LR scaling: every learning rate (and min_lr) is
            multiplied by global_batch / lr_scale_batch_size (the paper: 512).
        layer_decay: Layer-wise LR decay for fine-tuning, in (0, 1]: the head trains at the
            optimizer's lr, each layer below it (blocks, then the patch embedding) at
            ``layer_decay`` times the rate of the layer above. None: one rate for all.
        pretrained: Path to official, timm, torchvision or swin_lightning weights to start
            from (loaded before training; see ``swin_lightning.models.load_pretrained``).
            Fine-tuning adaptations apply: position tables are resized bicubically to the
            window size and patch grid, and a head of another class count is replaced;
            ``pretrained_report`` lists them.
        compile: ``torch.compile`` the network: 'none', 'full' (the whole network as one
            graph) or 'regional' (each Swin block on its own: blocks of one shape share the
            compiled code, so the warm-up is shorter). Compiled in place, so checkpoints and
            weights files have the same keys with compile on or off.
        compile_mode: ``torch.compile``'s mode ('default', 'reduce-overhead',
            'max-autotune', 'max-autotune-no-cudagraphs').
        compile_dynamic: ``torch.compile``'s ``dynamic``. None: torch's default (dynamic
            shapes after a shape changes) for 'full', static shapes for 'regional' (each
            block shape is compiled once).
        compile_backend: ``torch.compile``'s backend ('inductor'; 'eager' or 'aot_eager'
            to debug).
        tta: Test-time augmentation of validate/test/predict (and fit's validation): 'none',
            'flip' (the image and its mirror image) or 'flip_zoom' (both also zoomed in by
            15% and centre-cropped), softmax scores averaged (swin_lightning.tta). Not saved
            in checkpoints: give it when evaluating.
    """

    def __init__(
        self,
        net: SwinTransformer,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: Literal["batch", "pair", "elem"] = "batch",
        lr_scale_batch_size: int | None = None,
        layer_decay: float | None = None,
        pretrained: str | None = None,
        compile: Literal["none", "full", "regional"] = "none",
        compile_mode: Literal[
            "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
        ] = "default",
        compile_dynamic: bool | None = None,
        compile_backend: str = "inductor",
        tta: TTA = "none",
    ):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        if lr_scale_batch_size is not None and lr_scale_batch_size <= 0:
            raise ValueError(f"lr_scale_batch_size={lr_scale_batch_size} must be > 0")
        if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
            raise ValueError(
                f"model.layer_decay={layer_decay} must be in (0, 1] (or null: no layer decay)"
            )
        lr = optimizer.keywords.get("lr") if isinstance(optimizer, functools.partial) else None
        if isinstance(lr, int | float) and not lr > 0:
            raise ValueError(f"model.optimizer.init_args.lr={lr} must be > 0")
        # tta is chosen when evaluating (not saved: --ckpt_path would bring back the saved one)
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler", "tta"])
        if tta not in TTA_CHOICES:
            raise ValueError(f"model.tta={tta!r} is not one of {', '.join(TTA_CHOICES)}")
        self.tta = tta
        self.net = net
        self.pretrained_report: LoadReport | None = None
        if pretrained:
            self.pretrained_report = load_pretrained(net, pretrained, adapt=True)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        num_classes = net.num_classes
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                prob=mixup_prob,
                switch_prob=mixup_switch_prob,
                mode=mixup_mode,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
            self.train_loss = SoftTargetCrossEntropy()
        else:
            self.train_loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.eval_loss = nn.CrossEntropyLoss()
        top_k = min(5, num_classes)
        for stage in STAGES:  # one collection per stage, so each is reset and synced alone
            metrics = MetricCollection(
                {
                    "acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                    "acc5": MulticlassAccuracy(num_classes, top_k=top_k, average="micro"),
                },
                prefix=f"{stage}/",
            )
            setattr(self, f"{stage}_metrics", metrics)
        compile_network(net, compile, compile_mode, compile_dynamic, compile_backend)
        # Lets Lightning's model summary report output shapes and FLOPs.
        self.example_input_array = torch.zeros(1, net.patch_embed.in_chans, *net.img_size)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip as ``trainer.gradient_clip_*`` say; under FSDP by the norm of all shards.

        Lightning's FSDP plugin refuses norm clipping, since clipping each rank's shards
        alone would be wrong; FSDP's own ``clip_grad_norm_`` computes the global norm.
        """
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = self.trainer.strategy
        by_norm = gradient_clip_algorithm in (None, "norm")
        if gradient_clip_val and by_norm and isinstance(strategy, FSDPStrategy):
            strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose weights do not fit this model, listing every such key."""
        wrong = shape_mismatches(checkpoint.get("state_dict", {}), self.state_dict())
        if wrong:
            raise ValueError(
                "ckpt_path: the checkpoint does not fit the configured model; mismatched "
                "shapes:\n  " + "\n  ".join(wrong) + "\nUse the model.net and data settings "
                "it was trained with, or model.pretrained to fine-tune (which adapts the head "
                "and position tables)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def setup(self, stage: str) -> None:
        set_flops(self, stage)

    def on_fit_start(self) -> None:
        # Model size in the run's own logs, so reports can be built from event files alone.
        if self.logger is not None:
            params = sum(p.numel() for p in self.net.parameters())
            gmacs = self.forward_flops / 2 / 1e9  # multiply-adds per image, as in the paper
            self.logger.log_metrics({"model/params": params, "model/gmacs": gmacs}, step=0)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        images, targets = batch
        inputs, soft_targets = images, targets
        if self.mixup is not None:
            if images.shape[0] % 2:
                raise ValueError(
                    f"Mixup/CutMix needs an even batch size, got {images.shape[0]}: set "
                    "data.batch_size even (and drop_last on, the default for training)"
                )
            inputs, soft_targets = self.mixup(images, targets)
        logits = self(inputs)
        loss = self.train_loss(logits, soft_targets)
        self._log_step("train", loss, logits, targets)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        self._eval_step("val", batch)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        self._eval_step("test", batch)

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int):
        # (images, indices) or, from ImageListDataset, (images, indices, read errors)
        images, indices = batch[0], batch[1]
        errors = list(batch[2]) if len(batch) > 2 else [""] * len(indices)
        return {"indices": indices, "probs": self.eval_logits(images).softmax(dim=-1),
                "errors": errors}  # fmt: skip

    def eval_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for evaluation; with ``tta``, the log of the views' mean probabilities."""
        if self.tta == "none":
            return self(images)
        return tta_probs(self, images, self.tta).clamp_min(1e-12).log()

    def _eval_step(self, stage: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        images, targets = batch
        logits = self.eval_logits(images)
        self._log_step(stage, self.eval_loss(logits, targets), logits, targets)

    def _log_step(self, stage: str, loss: torch.Tensor, logits: torch.Tensor, targets) -> None:
        # With Mixup, training accuracy is measured against the unmixed labels.
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits.detach(), targets)
        # Training loss per step (the curve to watch), evaluation loss per epoch.
        train = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=train, on_epoch=not train, sync_dist=not train)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val")

    def parameter_groups(self) -> list[dict[str, Any]]:
        """No weight decay on norms, biases and position tables; layer-wise LR decay if set."""
        keywords = self.net.no_weight_decay_keywords()
        layer_decay = self.hparams.get("layer_decay")
        if layer_decay is None:
            return weight_decay_groups(self.net, keywords)
        return layer_decay_groups(self.net, layer_decay, keywords)
