"""Where a Swin looks: Grad-CAM on the last stage's token map, and attention rollout across
shifted windows.

- :func:`grad_cam`: the ``grad-cam`` package's Grad-CAM (the ``analysis`` extra) on the
  norm before the attention of the last block; Swin's ``(B, H, W, C)`` token map is reshaped
  to ``NCHW`` for it.
- :func:`attention_rollout`: Abnar and Zuidema's rollout (attention plus the residual path,
  rows renormalized, multiplied through the blocks), written for windows: each block's
  window attention is scattered into one token-by-token matrix of the whole grid, through the
  block's own cyclic shift and padding, and patch merging hands each merged token the mean of
  its 2x2 children. The pooled output's row, on the patch grid, is the map.

Both return maps ``(B, H, W)`` at the image size, scaled to [0, 1] per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from swin_lightning.models.swin import SwinTransformer
from swin_lightning.models.windows import window_partition


def _to_image(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, h, w)`` maps resized to ``size`` and scaled to [0, 1] per image."""
    maps = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[
        :, 0
    ]
    low = maps.flatten(1).min(1).values.view(-1, 1, 1)
    high = maps.flatten(1).max(1).values.view(-1, 1, 1)
    return (maps - low) / (high - low).clamp_min(1e-12)


def grad_cam(net: SwinTransformer, images: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Grad-CAM maps of ``classes`` (one per image) from the last block's token map."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = net.layers[-1].blocks[-1].norm1  # the last stage's token map, (B, H, W, C)
    with GradCAM(net, [layer], reshape_transform=lambda t: t.permute(0, 3, 1, 2)) as cam:
        maps = cam(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in classes])
    return _to_image(torch.from_numpy(maps), tuple(images.shape[-2:]))


def _window_index(block, H: int, W: int) -> tuple[torch.Tensor, int, int]:
    """For the block's windows ``(nW, N)``: the flat position of each window slot in its
    padded ``Hp x Wp`` grid (the block's own padding and cyclic shift applied)."""
    Hp, Wp = block.padded_size(H, W)
    grid = torch.arange(Hp * Wp, dtype=torch.float64).view(1, Hp, Wp, 1)
    if block.shifted:
        grid = torch.roll(grid, shifts=(-block.shift_size[0], -block.shift_size[1]), dims=(1, 2))
    windows = window_partition(grid, block.window_size)  # (1, nW, N, 1)
    return windows[0, ..., 0].long(), Hp, Wp


def _block_matrix(block, x: torch.Tensor) -> torch.Tensor:
    """The block's attention over the whole grid, ``(B, H*W, H*W)``: window attention
    (mean over heads) scattered to grid positions, plus the residual path, rows summing
    to 1."""
    B, H, W, _ = x.shape
    if getattr(block, "mixer", "attention") != "attention":
        raise ValueError("attention rollout follows attention weights; this network mixes "
                         "tokens with an MLP (mixer: mlp): use Grad-CAM")  # fmt: skip
    probs = block.attention_probs(x).mean(dim=2)  # (B, nW, N, N)
    index, Hp, Wp = _window_index(block, H, W)
    full = torch.zeros(B, Hp * Wp, Hp * Wp, dtype=probs.dtype)
    rows = index[:, :, None].expand_as(probs[0])
    cols = index[:, None, :].expand_as(probs[0])
    full[:, rows, cols] = probs
    keep = (torch.arange(Hp)[:, None] < H) & (torch.arange(Wp)[None, :] < W)
    keep = keep.flatten().nonzero()[:, 0]  # the real (unpadded) tokens
    full = full[:, keep][:, :, keep]
    full = 0.5 * full + 0.5 * torch.eye(H * W, dtype=full.dtype)
    return full / full.sum(-1, keepdim=True)


def _merge_matrix(H: int, W: int) -> torch.Tensor:
    """``(H/2*W/2, H*W)``: each merged token takes the mean of its 2x2 children."""
    h, w = (H + 1) // 2, (W + 1) // 2
    merge = torch.zeros(h * w, H * W)
    for i in range(H):
        for j in range(W):
            merge[(i // 2) * w + j // 2, i * W + j] = 1.0
    return merge / merge.sum(-1, keepdim=True)


@torch.no_grad()
def rollout_matrix(net: SwinTransformer, images: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """``(B, last-stage tokens, input patches)``: how much each last-stage token draws on
    each input patch through every block and merging; and the patch grid ``(h, w)``."""
    inputs: list[torch.Tensor] = []
    hooks = [block.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
             for stage in net.layers for block in stage.blocks]  # fmt: skip
    try:
        net(images)
    finally:
        for hook in hooks:
            hook.remove()
    blocks = [block for stage in net.layers for block in stage.blocks]
    rollout = None  # (B, tokens now, input patches)
    grid = previous = (0, 0)
    for block, x in zip(blocks, inputs, strict=True):
        H, W = x.shape[1:3]
        if rollout is None:
            grid = (H, W)
            rollout = torch.eye(H * W).expand(x.shape[0], -1, -1)
        elif rollout.shape[1] != H * W:  # patch merging came before this block
            rollout = _merge_matrix(*previous).to(rollout.dtype) @ rollout
        previous = (H, W)
        rollout = _block_matrix(block, x).to(rollout.dtype) @ rollout
    return rollout, grid


def attention_rollout(net: SwinTransformer, images: torch.Tensor) -> torch.Tensor:
    """Attention rollout maps ``(B, H, W)`` of the pooled output over the input patches."""
    rollout, grid = rollout_matrix(net, images)
    pooled = rollout.mean(dim=1)  # the head sees the mean of the last tokens
    return _to_image(pooled.view(-1, *grid), tuple(images.shape[-2:]))
