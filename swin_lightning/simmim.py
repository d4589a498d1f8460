"""SimMIM (Xie et al., CVPR 2022): masked image modeling to pretrain the Swin encoder on
unlabeled images.

Random blocks of the image (``mask_patch_size`` pixels a side) are chosen; the embeddings of
their patches are replaced by a learned mask token right after the patch embedding; the Swin
encoder runs as usual; a light decoder (a 1x1 convolution to ``stride^2 * 3`` channels and a
pixel shuffle) predicts the pixels back at input size; the loss is the L1 distance on the
masked pixels only. Labels are ignored, so every classification data module serves.

The encoder is the project's :class:`~swin_lightning.models.SwinTransformer` (V1 or V2
switches alike); its weights are ``net.*`` in the checkpoint, so ``model.pretrained=<SimMIM
checkpoint>`` in any classification config fine-tunes them (the decoder and mask token are
dropped).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from swin_lightning.models import SwinTransformer
from swin_lightning.models.net_spec import SelfContainedCheckpoint
from swin_lightning.optimization import StepScheduledOptimization, set_flops, weight_decay_groups

# Validation masks come from their own seeds, apart from the training steps' seeds.
VAL_SEED_OFFSET = 1_000_003


def random_block_mask(
    batch: int,
    image_size: tuple[int, int],
    mask_patch_size: int,
    model_patch_size: int,
    mask_ratio: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """SimMIM's random block mask on the model's patch grid, ``(batch, H/p, W/p)`` bool.

    The image is tiled into ``mask_patch_size`` blocks; in each sample exactly
    ``ceil(mask_ratio * blocks)`` of them, drawn uniformly from ``generator``, are masked, and
    every model patch in a masked block is masked.
    """
    rows, cols = image_size[0] // mask_patch_size, image_size[1] // mask_patch_size
    blocks = rows * cols
    count = math.ceil(mask_ratio * blocks)
    order = torch.rand(batch, blocks, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, blocks, dtype=torch.bool)
    mask.scatter_(1, order[:, :count], True)
    scale = mask_patch_size // model_patch_size
    mask = mask.view(batch, rows, cols)
    return mask.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def normalize_patches(images: torch.Tensor, size: int) -> torch.Tensor:
    """Each pixel normalised by the mean and (unbiased) variance of the ``size`` x ``size``
    window around it, per channel: SimMIM's normalised targets."""
    pad = size // 2
    mean = F.avg_pool2d(images, size, stride=1, padding=pad, count_include_pad=False)
    square = F.avg_pool2d(images**2, size, stride=1, padding=pad, count_include_pad=False)
    var = (square - mean**2).clamp_min(0) * (size**2 / (size**2 - 1))
    return (images - mean) / (var + 1e-6).sqrt()


def reconstruction_loss(
    reconstruction: torch.Tensor, target: torch.Tensor, pixel_mask: torch.Tensor
) -> torch.Tensor:
    """Mean L1 distance over the masked pixels (``pixel_mask`` 1) of every channel."""
    weight = pixel_mask.to(reconstruction.dtype)
    error = F.l1_loss(reconstruction, target, reduction="none") * weight
    return error.sum() / (weight.sum() * reconstruction.shape[1] + 1e-5)


class SimMIM(SelfContainedCheckpoint, StepScheduledOptimization, L.LightningModule):
    """SimMIM masked image modeling: pretrain a Swin encoder without labels.

    Args:
        net: The Swin encoder; its constructor arguments are the YAML keys under
            ``model.init_args.net`` (``img_size`` comes from the data module; the
            classification head is not built).
        optimizer: Optimizer class and arguments (AdamW by default). No weight decay on
            norms, biases, position tables and the mask token.
        lr_scheduler: Schedule stepped every optimizer step (e.g. ``WarmupCosineLR``).
        mask_patch_size: Side in pixels of the masked blocks (32 in the paper); a multiple
            of the model's patch size that divides the image size.
        mask_ratio: Fraction of blocks masked in every image, in (0, 1).
        mask_seed: Seed of the masks: a training step's mask depends only on this and the
            step, so runs and resumed runs draw the same masks.
        norm_target: Reconstruct pixels normalised by their local mean and variance.
        norm_target_patch_size: Window of that normalisation (odd; the paper: 47).
        lr_scale_batch_size: If set, linear LR scaling by global batch / this.
        log_images: Images in the TensorBoard grid (input / masked / reconstruction)
            written after every validation epoch; 0: none.
    """

    def __init__(
        self,
        net: SwinTransformer,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
        mask_seed: int = 0,
        norm_target: bool = False,
        norm_target_patch_size: int = 47,
        lr_scale_batch_size: int | None = None,
        log_images: int = 8,
    ):
        super().__init__()
        patch = net.patch_embed.patch_size
        stride = patch * 2 ** (len(net.layers) - 1)
        height, width = net.img_size
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"model.mask_ratio={mask_ratio} must be in (0, 1)")
        if mask_patch_size <= 0 or mask_patch_size % patch:
            raise ValueError(
                f"model.mask_patch_size={mask_patch_size} must be a positive multiple of the "
                f"model's patch_size={patch}"
            )
        if height % mask_patch_size or width % mask_patch_size:
            raise ValueError(
                f"model.mask_patch_size={mask_patch_size} does not tile the {height}x{width} "
                "input: use a divisor of the image size"
            )
        if height % stride or width % stride:
            raise ValueError(
                f"the {height}x{width} input is not a multiple of the encoder's total stride "
                f"{stride} (patch_size x 2^(stages-1)), so the decoder cannot restore it"
            )
        if norm_target and (norm_target_patch_size < 3 or norm_target_patch_size % 2 == 0):
            raise ValueError(
                f"model.norm_target_patch_size={norm_target_patch_size} must be odd and >= 3"
            )
        if lr_scale_batch_size is not None and lr_scale_batch_size <= 0:
            raise ValueError(f"lr_scale_batch_size={lr_scale_batch_size} must be > 0")
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])
        # The encoder only: SimMIM never uses a classification head.
        net.head, net.num_classes = nn.Identity(), 0
        self.net = net
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, net.patch_embed.proj.out_channels))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        in_chans = net.patch_embed.in_chans
        self.decoder = nn.Sequential(
            nn.Conv2d(net.num_features, stride**2 * in_chans, kernel_size=1),
            nn.PixelShuffle(stride),
        )
        self.stride = stride
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.example_input_array = torch.zeros(1, in_chans, height, width)

    # ------------------------------------------------------------------ masking and loss
    def make_mask(self, batch: int, seed: int) -> torch.Tensor:
        """The mask of a batch, from ``mask_seed`` and ``seed`` alone, on this module's device."""
        generator = torch.Generator().manual_seed(self.hparams.mask_seed * 7919 + seed)
        mask = random_block_mask(
            batch,
            self.net.img_size,
            self.hparams.mask_patch_size,
            self.net.patch_embed.patch_size,
            self.hparams.mask_ratio,
            generator,
        )
        return mask.to(self.device)

    def pixel_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The patch-grid mask at pixel resolution, ``(B, 1, H, W)``."""
        patch = self.net.patch_embed.patch_size
        return mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstructed images (``B, C, H, W``) from images whose ``mask`` patches are hidden."""
        if mask is None:
            mask = torch.zeros(images.shape[0], *self.net.patch_grid, dtype=torch.bool)
            mask = mask.to(images.device)
        # Hidden pixels are zeroed as well: a conv stem's overlapping filters would otherwise
        # carry them into the visible patches next to a masked block.
        images = images * (1 - self.pixel_mask(mask).to(images.dtype))
        features = self.net.forward_stages(
            self.net.embed_positions(self.embed_masked(images, mask))
        )
        return self.decoder(features.permute(0, 3, 1, 2))

    def embed_masked(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The backbone's patch embeddings ``(B, H/p, W/p, C)`` with those of the ``mask``
        patches (``B, H/p, W/p`` bool) replaced by the learned mask token."""
        x = self.net.patch_embed(images)
        if mask.shape[1:] != x.shape[1:3]:
            raise ValueError(
                f"mask of {tuple(mask.shape[1:])} patches does not fit the "
                f"{tuple(x.shape[1:3])} patch grid"
            )
        hidden = mask.unsqueeze(-1).to(x.dtype)
        return x * (1 - hidden) + self.mask_token.to(x.dtype) * hidden

    def loss(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction loss on the masked pixels, reconstruction)."""
        reconstruction = self(images, mask)
        target = images
        if self.hparams.norm_target:
            target = normalize_patches(images, self.hparams.norm_target_patch_size)
        return reconstruction_loss(reconstruction, target, self.pixel_mask(mask)), reconstruction

    # ------------------------------------------------------------------ steps
    def setup(self, stage: str) -> None:
        set_flops(self, stage)  # the encoder's FLOPs (the 1x1 decoder adds little)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch[0]
        mask = self.make_mask(images.shape[0], seed=self.global_step)
        loss, _ = self.loss(images, mask)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images = batch[0]
        mask = self.make_mask(images.shape[0], seed=VAL_SEED_OFFSET + batch_idx)
        loss, reconstruction = self.loss(images, mask)
        self.log("val/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        if batch_idx == 0 and self.hparams.log_images > 0:
            self._log_grid(images, mask, reconstruction)

    def _log_grid(self, images: torch.Tensor, mask: torch.Tensor, reconstruction: torch.Tensor):
        experiment = getattr(self.logger, "experiment", None)
        if not hasattr(experiment, "add_image") or self.trainer.sanity_checking:
            return
        from torchvision.utils import make_grid

        n = min(self.hparams.log_images, images.shape[0])
        hidden = self.pixel_mask(mask[:n]).to(images.dtype)
        shown = images[:n]
        if self.hparams.norm_target:  # the prediction is in normalised units: show it so
            shown = normalize_patches(shown, self.hparams.norm_target_patch_size)
        rows = [shown, shown * (1 - hidden), reconstruction[:n] * hidden + shown * (1 - hidden)]
        grid = make_grid(torch.cat(rows).float().cpu(), nrow=n, normalize=True, scale_each=True)
        experiment.add_image("val/input_masked_reconstruction", grid, self.current_epoch)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """No weight decay on norms, biases, position tables and the mask token."""
        keywords = self.net.no_weight_decay_keywords() | {"mask_token"}
        return weight_decay_groups(self, keywords)
