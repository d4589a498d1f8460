"""A from-scratch Swin Transformer (Liu et al., ICCV 2021), written to be read, with Swin V2's
changes (Liu et al., CVPR 2022) as switches of the same blocks.

Pipeline: patch partition + linear embedding -> stages of Swin blocks that alternate W-MSA
and SW-MSA (cyclic shift, attention mask, relative position bias) -> patch merging at the
start of every stage after the first (halves the resolution, doubles the channels) -> final
LayerNorm -> global average pool -> linear head. Everything runs channels-last
(``B, H, W, C``). Parameter names follow timm's layout, so timm checkpoints load as they are
and the official and torchvision layouts need only key renames (see ``pretrained.py``).

Swin V2 is every switch at its V2 value (the ``swinv2_*`` presets); V1 is every switch at
its default, so V1 weights and logits do not depend on the V2 code:

- ``block_norm='post'``: residual post-norm, ``x + norm(attn(x))`` instead of
  ``x + attn(norm(x))``;
- ``attention='cosine'``: scaled cosine attention, ``cos(q, k) * exp(min(s, log 100))``
  with a learned logit scale ``s`` per head (no key bias), instead of ``q k^T / sqrt(d)``;
- ``pos_embed='cpb'``: log-spaced continuous position bias, ``16 * sigmoid(MLP(coords))``,
  instead of the learned bias table; ``pretrained_window_size`` for window transfer;
- ``merge_norm='post'``: patch merging reduces 4C -> 2C, then normalises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from swin_lightning.models.windows import (
    log_spaced_relative_coords,
    relative_position_index,
    shift_attention_mask,
    window_partition,
    window_reverse,
)

PosEmbed = Literal["rel", "cpb", "abs", "abs+rel", "abs+cpb", "none"]
POS_EMBED_CHOICES = ("rel", "cpb", "abs", "abs+rel", "abs+cpb", "none")
PositionBias = Literal["table", "cpb", "none"]
Attention = Literal["dot", "cosine"]
NormPlacement = Literal["pre", "post"]
Stem = Literal["patch", "conv"]
Mixer = Literal["attention", "mlp"]
STEM_CHOICES = ("patch", "conv")
ATTENTION_CHOICES = ("dot", "cosine")
NORM_PLACEMENTS = ("pre", "post")
# Swin V2 clamps the learned logit scale at log(1 / 0.01): cosine logits stay within +-100.
LOGIT_SCALE_MAX = math.log(100.0)
# Hidden width of Swin V2's continuous position bias MLP (as the paper's code).
CPB_HIDDEN = 512


def position_bias_kind(pos_embed: str) -> PositionBias:
    """The relative position bias a ``pos_embed`` setting asks for: table, cpb or none."""
    return "table" if "rel" in pos_embed else "cpb" if "cpb" in pos_embed else "none"


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {value!r}")
    return value  # type: ignore[return-value]


class PatchEmbed(nn.Module):
    """Patch partition + linear embedding, output ``B, H, W, C``.

    ``stem='patch'`` (the paper): one strided convolution, a linear map of each
    ``patch_size`` x ``patch_size`` patch. ``stem='conv'``: a small convolutional stem in
    the manner of Xiao et al. (NeurIPS 2021, "Early Convolutions Help Transformers See
    Better"): a stride-1 3x3 convolution, then one stride-2 3x3 convolution per halving of
    the resolution (``log2(patch_size)`` of them), each with BatchNorm and GELU, and a 1x1
    convolution to ``embed_dim``. Its overlapping receptive fields add the locality a
    transformer otherwise learns from data, which helps most when images are few.
    """

    def __init__(
        self,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        norm: bool = True,
        stem: Stem = "patch",
    ):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        if stem == "conv":
            layers, channels = [], in_chans
            widths = [embed_dim // 2] + [embed_dim] * int(math.log2(patch_size))
            for i, width in enumerate(widths):
                layers += [
                    nn.Conv2d(channels, width, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.GELU(),
                ]
                channels = width
            self.stem = nn.Sequential(*layers)
            self.proj = nn.Conv2d(channels, embed_dim, kernel_size=1)
        else:
            self.stem = nn.Identity()
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(
                f"input of {H}x{W} pixels is not divisible by patch_size={self.patch_size}; "
                f"use an image size that is a multiple of {self.patch_size}"
            )
        return self.norm(self.proj(self.stem(x)).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood (4C) and map it linearly to 2C.

    ``norm='pre'`` (V1): LayerNorm over the 4C concatenation, then the linear map;
    ``norm='post'`` (V2): the linear map, then LayerNorm over its 2C output.
    """

    def __init__(self, dim: int, out_dim: int | None = None, norm: NormPlacement = "pre"):
        super().__init__()
        self.out_dim = out_dim or 2 * dim
        self.norm_first = norm == "pre"
        self.norm = nn.LayerNorm(4 * dim if self.norm_first else self.out_dim)
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:  # odd sizes: pad one zero row/column, as the reference code does
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = x.shape[1:3]
        # (h, w) neighbours ordered (0,0), (1,0), (0,1), (1,1): the official x0..x3 order.
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x)) if self.norm_first else self.norm(self.reduction(x))


class DropPath(nn.Module):
    """Stochastic depth per sample, as timm's ``DropPath``: in training, each sample's branch
    is zeroed with probability ``drop_prob`` and the kept ones are scaled by ``1/keep``.

    The rate is a (non-saved) tensor, not a Python float, so blocks of different rates run
    the same compiled code (``torch.compile`` specialises on float attributes). A rate of 0
    draws nothing, so runs without stochastic depth keep their random stream.
    """

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.active = drop_prob > 0
        self.register_buffer("keep_prob", torch.tensor(1.0 - drop_prob), persistent=False)

    @property
    def drop_prob(self) -> float:
        return 1.0 - float(self.keep_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.active and self.training):
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(self.keep_prob)
        return x * keep.div_(self.keep_prob)


class Mlp(nn.Module):
    """Two-layer feed-forward network with GELU."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with an optional relative position bias.

    The bias (``heads, N, N``) and the shift mask (``nW, N, N``) are summed into one additive
    tensor and handed to :func:`torch.nn.functional.scaled_dot_product_attention`, so fused
    kernels are used wherever the backend has them.

    Args:
        position_bias: 'table' (V1: a learned ``(2w-1)^2 x heads`` table), 'cpb' (V2: an MLP
            over log-spaced offsets, ``16 * sigmoid``) or 'none'.
        attention: 'dot' (V1: ``q k^T / sqrt(d)``) or 'cosine' (V2: cosine similarity times
            a learned per-head scale, clamped at 100; the key projection has no bias).
        pretrained_window_size: For 'cpb': the window the weights were trained at (0: this
            window); offsets are normalised by it, so a larger window extrapolates.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: tuple[int, int],
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        position_bias: PositionBias = "table",
        attention: Attention = "dot",
        pretrained_window_size: tuple[int, int] = (0, 0),
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.attn_drop = attn_drop
        cosine = attention == "cosine"
        # Cosine attention normalises k, so a key bias would change the result: V2 has none,
        # and keeps separate q and v biases (timm's and the official parameter names).
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias and not cosine)
        if cosine and qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.logit_scale = (
            nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0))) if cosine else None
        )
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = self.cpb_mlp = None
        if position_bias == "table":
            wh, ww = window_size
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads)
            )
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        elif position_bias == "cpb":
            self.cpb_mlp = nn.Sequential(
                nn.Linear(2, CPB_HIDDEN),
                nn.ReLU(inplace=True),
                nn.Linear(CPB_HIDDEN, num_heads, bias=False),
            )
            coords = log_spaced_relative_coords(window_size, pretrained_window_size)
            self.register_buffer("relative_coords_table", coords, persistent=False)
        if position_bias != "none":
            self.register_buffer(
                "relative_position_index", relative_position_index(window_size), persistent=False
            )

    def relative_position_bias(self) -> torch.Tensor | None:
        """The bias for every query/key pair of a window: ``(heads, N, N)``, or None."""
        if self.cpb_mlp is not None:
            table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        elif self.relative_position_bias_table is not None:
            table = self.relative_position_bias_table
        else:
            return None
        N = self.window_size[0] * self.window_size[1]
        bias = table[self.relative_position_index.view(-1)].view(N, N, self.num_heads)
        bias = bias.permute(2, 0, 1)
        return 16 * torch.sigmoid(bias) if self.cpb_mlp is not None else bias

    def _project(self, x: torch.Tensor):
        """``q, k, v`` of windows ``(B, nW, N, C)``, each ``(B, nW, N, heads, d)``, and the
        logit scale to attend with (None: ``1/sqrt(d)``). Cosine attention returns unit
        keys and unit queries already multiplied by the clamped per-head scale."""
        B, nW, N, _ = x.shape
        h, d = self.num_heads, self.head_dim
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.view(B, nW, N, 3, h, d).unbind(3)
        if self.logit_scale is None:
            return q, k, v, None
        scale = self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp().view(h, 1)
        return F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1), v, 1.0

    def attention_probs(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The softmax weights ``(B, nW, heads, N, N)``, computed explicitly (for pictures)."""
        q, k, _, scale = self._project(x)
        q, k = q.transpose(2, 3), k.transpose(2, 3)  # (B, nW, heads, N, d)
        logits = (q * (scale or self.head_dim**-0.5)) @ k.transpose(-2, -1)
        bias = self.relative_position_bias()
        if bias is not None:
            logits = logits + bias
        if mask is not None:
            logits = logits + mask.unsqueeze(1)
        return logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: windows ``(B, nW, N, C)``; ``mask``: additive ``(nW, N, N)`` or None."""
        B, nW, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        q, k, v, scale = self._project(x)
        bias = self.relative_position_bias()
        dropout_p = self.attn_drop if self.training else 0.0
        if mask is None:
            # Same bias for every window: fold windows into the batch, broadcast over it.
            q, k, v = (t.reshape(B * nW, N, h, d).transpose(1, 2) for t in (q, k, v))
            additive = None if bias is None else bias.unsqueeze(0)
            out = attend(q, k, v, additive, dropout_p, scale)
            out = out.transpose(1, 2).reshape(B, nW, N, C)
        else:
            # Per-window mask: fold windows into the head axis, so one (1, nW*h, N, N)
            # tensor broadcasts over the batch instead of being copied for every image.
            additive = mask.unsqueeze(1) if bias is None else mask.unsqueeze(1) + bias
            additive = additive.expand(nW, h, N, N).reshape(1, nW * h, N, N)
            q, k, v = (t.transpose(2, 3).reshape(B, nW * h, N, d) for t in (q, k, v))
            out = attend(q, k, v, additive, dropout_p, scale)
            out = out.view(B, nW, h, N, d).transpose(2, 3).reshape(B, nW, N, C)
        return self.proj_drop(self.proj(out))


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    additive: torch.Tensor | None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + additive) v`` (``scale`` None: ``1/sqrt(d)``), with the
    fastest kernel for the case.

    :func:`~torch.nn.functional.scaled_dot_product_attention` everywhere, except on the CPU
    when the additive bias needs a gradient (training with a relative position bias): the
    CPU's fused kernel cannot return that gradient and its fallback is slower than a plain
    matmul-softmax-matmul (see ``python -m swin_lightning bench``).
    """
    if additive is not None and additive.requires_grad and q.device.type == "cpu":
        return attend_explicit(q, k, v, additive, dropout_p, scale)
    if additive is not None:
        additive = additive.to(q.dtype)  # SDPA wants the mask in the query's dtype
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=additive, dropout_p=dropout_p, scale=scale
    )


def attend_explicit(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    additive: torch.Tensor | None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """The same attention as :func:`attend`, written out as matmul, softmax, matmul."""
    logits = torch.matmul(q, k.transpose(-2, -1))
    if scale != 1.0:
        # Scaled in place: the matmul's backward does not need the logits it overwrites.
        logits = logits.mul_(q.shape[-1] ** -0.5 if scale is None else scale)
    if additive is not None:
        # Under autocast the logits are bf16/fp16 and the additive stays fp32: the sum is
        # fp32, so the softmax runs (faster and more exactly) in fp32, as timm's does.
        logits = logits.add_(additive) if logits.dtype == additive.dtype else logits + additive
    probs = F.dropout(logits.softmax(dim=-1), dropout_p) if dropout_p else logits.softmax(dim=-1)
    return torch.matmul(probs.to(v.dtype), v)


class SwinBlock(nn.Module):
    """Swin block: (S)W-MSA + residual, then MLP + residual, both with drop path.

    ``norm='pre'`` (V1) normalises each branch's input, ``x + f(norm(x))``; ``norm='post'``
    (V2's residual post-norm) its output, ``x + norm(f(x))``, so the residual stream's
    activations do not grow with depth; the post-norms start at zero (the official V2
    code's initialisation), so the block starts as the identity.

    As in the paper's code, a stage whose resolution is not larger than the window uses
    a window equal to the resolution and no shift (the window is then global).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        input_resolution: tuple[int, int],
        window_size: int,
        shift: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        position_bias: PositionBias = "table",
        attention: Attention = "dot",
        norm: NormPlacement = "pre",
        pretrained_window_size: int = 0,
        mixer: Mixer = "attention",
    ):
        super().__init__()
        self.post_norm = norm == "post"
        self.mixer = mixer
        self.input_resolution = input_resolution
        self.window_size = tuple(min(r, window_size) for r in input_resolution)
        self.shift_size = tuple(
            window_size // 2 if shift and r > window_size else 0 for r in input_resolution
        )
        self.norm1 = nn.LayerNorm(dim)
        self.num_heads = num_heads
        if mixer == "mlp":  # Swin-MLP: a spatial MLP per head over each window's tokens
            tokens = num_heads * self.window_size[0] * self.window_size[1]
            self.spatial_mlp = nn.Conv1d(tokens, tokens, kernel_size=1, groups=num_heads)
        else:
            self.attn = WindowAttention(
                dim, num_heads, self.window_size, qkv_bias, attn_drop, proj_drop, position_bias,
                attention, (pretrained_window_size, pretrained_window_size),
            )  # fmt: skip
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        if self.post_norm:
            # As the official V2 code: post-norms start at zero, so every block starts as the
            # identity and each branch's contribution grows from nothing.
            for norm in (self.norm1, self.norm2):
                nn.init.zeros_(norm.weight), nn.init.zeros_(norm.bias)
        # The shift mask only depends on the (padded) resolution: build it once for the
        # configured one; other input sizes get theirs built and cached on first use.
        self._mask_cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        padded = self.padded_size(*input_resolution)
        mask = self._build_mask(*padded) if mixer == "attention" else None
        self.register_buffer("attn_mask", mask, persistent=False)

    @property
    def shifted(self) -> bool:
        return any(self.shift_size)

    def padded_size(self, H: int, W: int) -> tuple[int, int]:
        """The token grid after zero-padding ``H x W`` to whole windows."""
        wh, ww = self.window_size
        return H + (-H) % wh, W + (-W) % ww

    def _build_mask(self, Hp: int, Wp: int) -> torch.Tensor | None:
        if not self.shifted:
            return None
        return shift_attention_mask(Hp, Wp, self.window_size, self.shift_size)

    def shift_mask(self, Hp: int, Wp: int, device: torch.device) -> torch.Tensor | None:
        """Additive shift mask ``(nW, N, N)`` for a padded ``Hp x Wp`` grid, or None."""
        if not self.shifted:
            return None
        if (Hp, Wp) == self.padded_size(*self.input_resolution):
            return self.attn_mask
        key = (Hp, Wp, device)
        if key not in self._mask_cache:
            self._mask_cache[key] = self._build_mask(Hp, Wp).to(device)
        return self._mask_cache[key]

    def to_windows(self, x: torch.Tensor):
        """Pad, cyclic-shift and partition ``(B, H, W, C)``: windows, padded size, shift mask."""
        H, W = x.shape[1:3]
        Hp, Wp = self.padded_size(H, W)
        if (Hp, Wp) != (H, W):
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        if self.shifted:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        return window_partition(x, self.window_size), (Hp, Wp), self.shift_mask(Hp, Wp, x.device)

    def from_windows(self, windows: torch.Tensor, H: int, W: int, Hp: int, Wp: int):
        """Inverse of :meth:`to_windows`: merge, reverse the shift, crop the padding."""
        x = window_reverse(windows, self.window_size, Hp, Wp)
        if self.shifted:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x[:, :H, :W] if (Hp, Wp) != (H, W) else x

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        if self.mixer == "mlp":
            return self._spatial_mlp(x)
        windows, (Hp, Wp), mask = self.to_windows(x)
        return self.from_windows(self.attn(windows, mask), *x.shape[1:3], Hp, Wp)

    def _mlp_padding(self, H: int, W: int) -> tuple[int, int, int, int]:
        """Zero padding (top, bottom, left, right) of the MLP mixer: the shifted windows of
        Swin-MLP are the grid padded by ``window - shift`` before and ``shift`` after (no
        cyclic roll, so no mask), plus what tiles a grid the window does not divide."""
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        top, left = (wh - sh, ww - sw) if self.shifted else (0, 0)
        bottom = (sh if self.shifted else 0) + (-H) % wh
        right = (sw if self.shifted else 0) + (-W) % ww
        return top, bottom, left, right

    def _spatial_mlp(self, x: torch.Tensor) -> torch.Tensor:
        """Swin-MLP's token mixing: within each (shifted) window, a linear map over the
        window's tokens per head (a grouped 1x1 convolution), as the official code."""
        B, H, W, C = x.shape
        top, bottom, left, right = self._mlp_padding(H, W)
        if top or bottom or left or right:
            x = F.pad(x, (0, 0, left, right, top, bottom))
        Hp, Wp = x.shape[1:3]
        windows = window_partition(x, self.window_size)  # (B, nW, N, C)
        nW, N, h = windows.shape[1], windows.shape[2], self.num_heads
        heads = windows.reshape(B * nW, N, h, C // h).transpose(1, 2).reshape(B * nW, h * N, -1)
        mixed = self.spatial_mlp(heads).view(B * nW, h, N, C // h).transpose(1, 2)
        x = window_reverse(mixed.reshape(B, nW, N, C), self.window_size, Hp, Wp)
        return x[:, top : top + H, left : left + W]

    def spatial_weights(self) -> torch.Tensor:
        """The MLP mixer's token-mixing weights ``(heads, N, N)``: what it draws as its
        attention (row: output token, column: input token of the window)."""
        N = self.window_size[0] * self.window_size[1]
        return self.spatial_mlp.weight.detach().view(self.num_heads, N, N)

    @torch.no_grad()
    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights ``(B, nW, heads, N, N)`` for the block's input ``x`` (pictures);
        the MLP mixer's weights are the same for every image and window: its
        :meth:`spatial_weights`, softmax-normalised per row for display."""
        if self.mixer == "mlp":
            B = x.shape[0]
            nW = math.prod(-(-(r + (w if self.shifted else 0)) // w)
                           for r, w in zip(x.shape[1:3], self.window_size, strict=True))  # fmt: skip
            weights = self.spatial_weights().softmax(dim=-1)
            return weights.expand(B, nW, *weights.shape)
        windows, _, mask = self.to_windows(x if self.post_norm else self.norm1(x))
        return self.attn.attention_probs(windows, mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = x + self.drop_path(self.norm1(self._attention(x)))
            return x + self.drop_path(self.norm2(self.mlp(x)))
        x = x + self.drop_path(self._attention(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """Optional patch merging followed by ``depth`` blocks alternating W-MSA and SW-MSA."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        downsample: bool,
        shift: bool = True,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
        position_bias: PositionBias = "table",
        attention: Attention = "dot",
        block_norm: NormPlacement = "pre",
        merge_norm: NormPlacement = "pre",
        pretrained_window_size: int = 0,
        grad_checkpointing: bool = False,
        mixer: Mixer = "attention",
    ):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        self.downsample = PatchMerging(dim, out_dim, merge_norm) if downsample else nn.Identity()
        if downsample:
            input_resolution = tuple((r + 1) // 2 for r in input_resolution)
        self.output_resolution = input_resolution
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.Sequential(
            *[
                SwinBlock(
                    out_dim,
                    num_heads,
                    input_resolution,
                    window_size,
                    shift=shift and i % 2 == 1,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path[i],
                    position_bias=position_bias,
                    attention=attention,
                    norm=block_norm,
                    pretrained_window_size=pretrained_window_size,
                    mixer=mixer,
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class SwinTransformer(nn.Module):
    """Swin Transformer for image classification.

    Args:
        img_size: Input image size (int or (height, width)); must be divisible by patch_size.
        patch_size: Side of the square patches the image is partitioned into.
        in_chans: Number of input image channels.
        num_classes: Number of classes of the linear head (0: no head, features only).
        embed_dim: Channels after the linear embedding; doubled by every patch merging.
        depths: Number of Swin blocks per stage.
        num_heads: Attention heads per stage (same length as depths).
        window_size: Side of the square attention windows (M in the paper).
        mlp_ratio: Hidden size of the MLP relative to the block's channels.
        qkv_bias: Learn a bias for the query, key and value projections.
        drop_rate: Dropout after the MLP / attention projections and before the head.
        attn_drop_rate: Dropout on the attention weights.
        drop_path_rate: Stochastic depth rate of the last block; rises linearly from 0.
        shift: Alternate W-MSA with shifted-window SW-MSA (False: W-MSA only, the ablation).
        pos_embed: Position encoding: 'rel' (relative position bias table, the paper's
            default), 'cpb' (Swin V2's continuous position bias), 'abs' (learned absolute
            embedding), 'abs+rel', 'abs+cpb' or 'none'.
        attention: 'dot' (scaled dot product, V1) or 'cosine' (Swin V2's scaled cosine
            attention with a learned, clamped logit scale per head).
        block_norm: Where each block's LayerNorms sit: 'pre' (on the branch input, V1) or
            'post' (Swin V2's residual post-norm, on the branch output).
        merge_norm: Patch merging's LayerNorm 'pre' (before the 4C -> 2C reduction, V1) or
            'post' (after it, V2).
        pretrained_window_size: With pos_embed 'cpb': the window size the weights were
            pretrained at, one per stage or one for all (0: the model's own window). Set it
            when fine-tuning at a larger window, as Swin V2 does (12 -> 16 or 24).
        patch_norm: LayerNorm after the patch embedding.
        stem: 'patch' (the paper's linear embedding of non-overlapping patches) or 'conv'
            (3x3 convolutions with BatchNorm down to the patch grid; patch_size a power
            of 2). The conv stem helps on small datasets; pretrained weights of the
            official, timm and torchvision models use 'patch'.
        grad_checkpointing: Recompute blocks in the backward pass to save activation memory.
        pad_windows: Zero-pad a stage resolution the window does not tile (False: reject
            such an img_size at construction, as the paper's classification code does).
        mixer: How tokens of a window are mixed: 'attention' (W-MSA / SW-MSA) or 'mlp'
            (Swin-MLP, the official code's second model: a spatial MLP per head over each
            window's tokens, shifted windows by zero padding). With 'mlp' the attention-only
            settings must stay at their defaults (attention 'dot', qkv_bias, no 'cpb'); the
            relative position bias of pos_embed 'rel' does not exist in an MLP.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        shift: bool = True,
        pos_embed: PosEmbed = "rel",
        attention: Attention = "dot",
        block_norm: NormPlacement = "pre",
        merge_norm: NormPlacement = "pre",
        pretrained_window_size: int | Sequence[int] = 0,
        patch_norm: bool = True,
        grad_checkpointing: bool = False,
        pad_windows: bool = True,
        stem: Stem = "patch",
        mixer: Mixer = "attention",
    ):
        # The arguments as plain data: checkpoints store them (models/net_spec.py).
        given = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.init_args = {k: list(v) if isinstance(v, tuple | list) else v
                          for k, v in given.items()}  # fmt: skip
        img_size = _pair(img_size)
        depths, num_heads = list(depths), list(num_heads)
        validate_architecture(
            img_size, patch_size, embed_dim, depths, num_heads, window_size, mlp_ratio,
            drop_rate, attn_drop_rate, drop_path_rate, pos_embed, pad_windows, stem,
        )  # fmt: skip
        pretrained_windows = validate_v2_switches(
            len(depths), pos_embed, attention, block_norm, merge_norm, pretrained_window_size
        )
        validate_mixer(mixer, pos_embed, attention, qkv_bias)
        self.img_size = img_size
        self.num_classes = num_classes
        self.pos_embed = pos_embed
        self.pad_windows = pad_windows
        self.num_features = embed_dim * 2 ** (len(depths) - 1)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm, stem)
        grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.patch_grid = grid
        if "abs" in pos_embed:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, *grid, embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, dim, resolution = [], embed_dim, grid
        for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            out_dim = embed_dim * 2**i
            stage = SwinStage(
                dim, out_dim, resolution, depth, heads, window_size,
                downsample=i > 0, shift=shift, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_drop=drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                position_bias=position_bias_kind(pos_embed), attention=attention,
                block_norm=block_norm, merge_norm=merge_norm,
                pretrained_window_size=pretrained_windows[i], grad_checkpointing=grad_checkpointing,
                mixer=mixer,
            )  # fmt: skip
            stages.append(stage)
            dim, resolution = out_dim, stage.output_resolution
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_linear)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def no_weight_decay_keywords(self) -> set[str]:
        """Name fragments of parameters that take no weight decay (besides norms and biases)."""
        return {"relative_position_bias_table", "absolute_pos_embed", "cpb_mlp", "logit_scale"}

    def group_matcher(self, coarse: bool = False) -> dict[str, object]:
        """Parameter groups by depth, as timm's Swin (used by ``timm.optim`` layer decay).

        Stem (patch embedding, absolute position embedding) first, then one group per stage
        (``coarse``) or per block with each patch merging joined to the block after it; the
        final norm ends the last group. Parameters matched by no rule (the head) come last.
        """
        return {
            "stem": r"^(?:patch_embed|absolute_pos_embed)",
            "blocks": r"^layers\.(\d+)"
            if coarse
            else [
                (r"^layers\.(\d+)\.downsample", (0,)),
                (r"^layers\.(\d+)\.\w+\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        }

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_positions(self.patch_embed(x))

    def embed_positions(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embeddings ``(B, H/p, W/p, C)`` plus the absolute position embedding (if
        any, resized to the grid), then dropout: what the stages take. A task that edits the
        embeddings (SimMIM's mask token) calls ``patch_embed``, edits, then this."""
        if self.absolute_pos_embed is not None:
            pos = self.absolute_pos_embed
            if pos.shape[1:3] != x.shape[1:3]:
                pos = F.interpolate(
                    pos.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bicubic", align_corners=False
                ).permute(0, 2, 3, 1)
            x = x + pos
        return self.pos_drop(x)

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Output of every stage, ``(B, H_i, W_i, C_i)``, before the final norm."""
        x = self._embed(x)
        outputs = []
        for stage in self.layers:
            x = stage(x)
            outputs.append(x)
        return outputs

    def forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised features of the last stage from embedded patches ``(B, H/p, W/p, C)``."""
        return self.norm(self.layers(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised features of the last stage, ``(B, H, W, C)``."""
        return self.forward_stages(self._embed(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(x.mean(dim=(1, 2))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def validate_v2_switches(
    num_stages: int,
    pos_embed: str,
    attention: str,
    block_norm: str,
    merge_norm: str,
    pretrained_window_size: int | Sequence[int],
) -> list[int]:
    """Check Swin V2's switches; returns the pretrained window size of every stage."""
    for name, value, choices in (
        ("attention", attention, ATTENTION_CHOICES),
        ("block_norm", block_norm, NORM_PLACEMENTS),
        ("merge_norm", merge_norm, NORM_PLACEMENTS),
    ):
        if value not in choices:
            raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")
    sizes = (
        [pretrained_window_size] * num_stages
        if isinstance(pretrained_window_size, int)
        else list(pretrained_window_size)
    )
    if len(sizes) != num_stages or any(not isinstance(w, int) or w < 0 for w in sizes):
        raise ValueError(
            f"pretrained_window_size={pretrained_window_size!r} must be one int >= 0 or one per "
            f"stage ({num_stages} stages)"
        )
    if any(sizes) and "cpb" not in pos_embed:
        raise ValueError(
            f"pretrained_window_size={pretrained_window_size!r} only applies to the continuous "
            f"position bias, but pos_embed={pos_embed!r}; use pos_embed cpb (or abs+cpb), or "
            "leave pretrained_window_size at 0 (V1 tables are resized when loading instead)"
        )
    return sizes


def validate_mixer(mixer: str, pos_embed: str, attention: str, qkv_bias: bool) -> None:
    """Check ``mixer`` and refuse attention-only settings set for the MLP mixer."""
    if mixer not in ("attention", "mlp"):
        raise ValueError(f"mixer={mixer!r} is not one of attention, mlp")
    if mixer != "mlp":
        return
    wrong = [f"{k}={v!r}" for k, v, ok in (
        ("attention", attention, attention == "dot"),
        ("qkv_bias", qkv_bias, qkv_bias),
        ("pos_embed", pos_embed, "cpb" not in pos_embed),
    ) if not ok]  # fmt: skip
    if wrong:
        raise ValueError(f"mixer='mlp' has no attention, so {', '.join(wrong)} means nothing "
                         "for it: leave these at their defaults (pos_embed 'abs' or 'none' "
                         "for a position encoding)")  # fmt: skip


def validate_architecture(
    img_size: tuple[int, int],
    patch_size: int,
    embed_dim: int,
    depths: list[int],
    num_heads: list[int],
    window_size: int,
    mlp_ratio: float,
    drop_rate: float,
    attn_drop_rate: float,
    drop_path_rate: float,
    pos_embed: str,
    pad_windows: bool = True,
    stem: str = "patch",
) -> None:
    """Reject inconsistent settings before any weight is built, naming the setting at fault."""
    if stem not in STEM_CHOICES:
        raise ValueError(f"stem={stem!r} is not one of {', '.join(STEM_CHOICES)}")
    if stem == "conv" and (patch_size < 1 or patch_size & (patch_size - 1)):
        raise ValueError(
            f"stem='conv' halves the resolution with stride-2 convolutions, so patch_size "
            f"must be a power of 2 (1, 2, 4, 8, ...), got {patch_size}; or use stem='patch'"
        )
    if patch_size <= 0 or any(s <= 0 for s in img_size):
        raise ValueError(f"img_size={img_size} and patch_size={patch_size} must be positive")
    if img_size[0] % patch_size or img_size[1] % patch_size:
        raise ValueError(
            f"img_size={img_size} is not divisible by patch_size={patch_size}; "
            f"valid sizes are multiples of {patch_size}"
        )
    if len(depths) != len(num_heads) or not depths:
        raise ValueError(
            f"depths={depths} and num_heads={num_heads} must be non-empty and of equal "
            "length: one entry per stage"
        )
    if any(d < 1 for d in depths):
        raise ValueError(f"depths={depths}: every stage needs at least one block")
    for i, heads in enumerate(num_heads):
        dim = embed_dim * 2**i
        if heads < 1 or dim % heads:
            raise ValueError(
                f"stage {i} has {dim} channels (embed_dim={embed_dim} x 2^{i}), "
                f"not divisible by num_heads[{i}]={heads}"
            )
    if window_size < 1:
        raise ValueError(f"window_size={window_size} must be >= 1")
    if mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio={mlp_ratio} must be > 0")
    for name, rate in (
        ("drop_rate", drop_rate),
        ("attn_drop_rate", attn_drop_rate),
        ("drop_path_rate", drop_path_rate),
    ):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name}={rate} must be in [0, 1)")
    if pos_embed not in POS_EMBED_CHOICES:
        raise ValueError(f"pos_embed={pos_embed!r} is not one of {', '.join(POS_EMBED_CHOICES)}")
    resolution = (img_size[0] // patch_size, img_size[1] // patch_size)
    for i in range(len(depths)):
        if i > 0:  # patch merging halves the resolution (odd sizes rounded up)
            resolution = tuple((r + 1) // 2 for r in resolution)
        if not pad_windows and any(r > window_size and r % window_size for r in resolution):
            raise ValueError(
                f"stage {i} resolution {resolution} is not tiled by window_size={window_size} "
                "and pad_windows is off; use an img_size whose stage resolutions are multiples "
                "of (or not larger than) the window, or set pad_windows: true"
            )
