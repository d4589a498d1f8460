"""Load Swin weights from the official, timm, torchvision or this project's layout, safely.

Files are read with ``torch.load(weights_only=True)`` or safetensors: a checkpoint is never
unpickled into arbitrary objects, so a crafted file cannot run code.

For fine-tuning (``adapt=True``), weights trained at another window size, image size or class
count are adapted as the official code does: relative position bias tables and absolute
position embeddings are resized with bicubic interpolation, and a head of another class count
is left at its fresh initialisation. Every adaptation is listed in the :class:`LoadReport`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
# Buffers that the reference implementations save but this model derives from its shape.
_DERIVED_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")
# Containers that training scripts wrap state dicts in (official: "model", Lightning: "state_dict").
_WRAPPER_KEYS = ("state_dict", "model", "model_ema", "state_dict_ema")
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "net.", "encoder.")
# SimMIM's pretraining-only parts (ours: net./mask_token/decoder., the official code's:
# encoder./encoder.mask_token/decoder.): dropped, the encoder is what fine-tuning loads.
_PRETRAINING_ONLY = re.compile(r"^(?:decoder\.|(?:\w+\.)?mask_token$)")
_HEAD_KEYS = ("head.weight", "head.bias")


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: the layout it recognised, adaptations, leftover keys.

    Attributes:
        layout: 'official', 'timm', 'torchvision' or 'swin_lightning'.
        missing: Model keys the checkpoint lacks (a replaced head is not counted here).
        unexpected: Checkpoint keys the model does not have.
        resized: Keys resized with bicubic interpolation to the model's shape (relative
            position bias tables for another window size, the absolute position embedding
            for another patch grid), with their shapes.
        reinitialized: Head keys left at the model's fresh initialisation: the checkpoint's
            class count differs, or it has no head (a SimMIM encoder).
    """

    layout: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    reinitialized: list[str] = field(default_factory=list)

    @property
    def adapted(self) -> bool:
        """Whether anything was resized or reinitialised."""
        return bool(self.resized or self.reinitialized)

    def __str__(self) -> str:
        lines = [f"loaded weights in {self.layout} layout"]
        if self.resized:
            shapes = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in self.resized.items())
            lines.append(f"resized (bicubic) to the model ({len(self.resized)}): {shapes}")
        if self.reinitialized:
            lines.append(
                f"head left at its fresh init (another class count, or no head) "
                f"({len(self.reinitialized)}): {', '.join(self.reinitialized)}"
            )
        if self.missing:
            lines.append(f"missing in checkpoint ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(
                f"unexpected in checkpoint ({len(self.unexpected)}): {', '.join(self.unexpected)}"
            )
        return "\n".join(lines)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a weights file without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights not found: {path} (from the CLI: --model.pretrained=FILE)"
        )
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(
            f"pretrained weights {path} have suffix {path.suffix!r}; "
            f"expected one of {', '.join(WEIGHT_SUFFIXES)}"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError and friends: report without running anything
        raise ValueError(
            f"refused to load {path}: it is not a plain weights file (only tensors and "
            f"containers are allowed, nothing is unpickled as code). Reason: {err}"
        ) from err


def unwrap_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """Strip training-script containers ({'model': ...}, Lightning's 'state_dict') and prefixes."""
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    state = {
        k: v
        for k, v in obj.items()
        if isinstance(v, torch.Tensor) and not _PRETRAINING_ONLY.match(k)
    }
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """Name the layout of a Swin state dict: torchvision, official, timm or swin_lightning."""
    if any(k.startswith("features.") for k in state):
        return "torchvision"
    if "layers.0.downsample.reduction.weight" in state:
        return "official"  # patch merging at the end of a stage: stage 0 has one
    if any(k.startswith("head.fc.") for k in state):
        return "timm"
    return "swin_lightning"


def _from_official(state: dict, model: nn.Module) -> dict:
    out = {}
    for k, v in state.items():
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) + 1}.downsample", k)
        if k == "absolute_pos_embed" and v.dim() == 3:  # (1, L, C) -> (1, H, W, C)
            grid = tuple(model.patch_grid)
            side = math.isqrt(v.shape[1])
            if v.shape[1] != grid[0] * grid[1] and side * side == v.shape[1]:
                grid = (side, side)  # another image size: resized later if adapt=True
            if v.shape[1] == grid[0] * grid[1]:
                v = v.reshape(1, *grid, v.shape[-1])
        out[k] = v
    return out


def _from_timm(state: dict, model: nn.Module) -> dict:
    return {re.sub(r"^head\.fc\.", "head.", k): v for k, v in state.items()}


def _from_torchvision(state: dict, model: nn.Module) -> dict:
    out = {}
    for k, v in state.items():
        if m := re.match(r"features\.0\.(\d)\.(.*)", k):
            k = {"0": "patch_embed.proj.", "2": "patch_embed.norm."}[m[1]] + m[2]
        elif m := re.match(r"features\.(\d+)\.(\d+)\.(.*)", k):  # odd n: blocks of a stage
            rest = re.sub(r"^mlp\.0\.", "mlp.fc1.", re.sub(r"^mlp\.3\.", "mlp.fc2.", m[3]))
            if rest == "attn.qkv.bias" and k.replace("qkv.bias", "logit_scale") in state:
                # Swin V2 (cosine attention): torchvision keeps a full qkv bias and zeroes its
                # key third at every forward; the model holds only query and value biases.
                rest, (q_bias, _, v) = "attn.v_bias", v.chunk(3)
                out[f"layers.{(int(m[1]) - 1) // 2}.blocks.{m[2]}.attn.q_bias"] = q_bias
            k = f"layers.{(int(m[1]) - 1) // 2}.blocks.{m[2]}.{rest}"
        elif m := re.match(r"features\.(\d+)\.(reduction|norm)\.(.*)", k):  # even n: merging
            k = f"layers.{int(m[1]) // 2}.downsample.{m[2]}.{m[3]}"
        out[k] = v
    return out


_CONVERTERS = {
    "official": _from_official,
    "timm": _from_timm,
    "torchvision": _from_torchvision,
    "swin_lightning": lambda state, model: dict(state),
}


def convert_state_dict(state: Mapping, model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """Convert any supported layout to this project's keys; returns (state, layout name)."""
    state = unwrap_state_dict(state)
    layout = detect_layout(state)
    state = _CONVERTERS[layout](state, model)
    state = {k: v for k, v in state.items() if not k.endswith(_DERIVED_BUFFERS)}
    return state, layout


def resize_rel_pos_bias_table(table: torch.Tensor, window_size: tuple[int, int]) -> torch.Tensor:
    """Resize a ``((2w-1)^2, heads)`` relative position bias table to another window.

    The table is read as a ``(heads, 2w-1, 2w-1)`` image, resized bicubically to
    ``(2Wh-1, 2Ww-1)`` and flattened back, as the official Swin code does.
    """
    length, heads = table.shape
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"relative position bias table of {length} rows is not (2w-1)^2 rows")
    size = (2 * window_size[0] - 1, 2 * window_size[1] - 1)
    image = table.T.reshape(1, heads, side, side).float()
    image = F.interpolate(image, size=size, mode="bicubic", align_corners=False)
    return image.reshape(heads, -1).T.contiguous().to(table.dtype)


def resize_abs_pos_embed(embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize an absolute position embedding ``(1, H, W, C)`` to ``(1, *grid, C)``, bicubic."""
    image = F.interpolate(
        embed.permute(0, 3, 1, 2).float(), size=tuple(grid), mode="bicubic", align_corners=False
    )
    return image.permute(0, 2, 3, 1).contiguous().to(embed.dtype)


def _adapt(
    state: dict[str, torch.Tensor], model: nn.Module, expected: Mapping[str, torch.Tensor]
) -> tuple[dict[str, tuple[tuple[int, ...], tuple[int, ...]]], list[str]]:
    """Resize position tables and drop a head of another class count, in place.

    Returns (resized keys with their old and new shapes, dropped head keys). Other shape
    mismatches are left for the caller to report.
    """
    resized, dropped = {}, []
    for k, v in list(state.items()):
        if k not in expected or v.shape == expected[k].shape:
            continue
        target = expected[k].shape
        if (
            k.endswith("relative_position_bias_table")
            and v.dim() == 2
            and v.shape[1] == target[1]
            and math.isqrt(v.shape[0]) ** 2 == v.shape[0]
        ):
            window = model.get_submodule(k.rsplit(".", 1)[0]).window_size
            state[k] = resize_rel_pos_bias_table(v, window)
        elif k == "absolute_pos_embed" and v.dim() == 4 and v.shape[-1] == target[-1]:
            state[k] = resize_abs_pos_embed(v, target[1:3])
        elif k in _HEAD_KEYS and v.shape[1:] == target[1:]:
            del state[k]
            dropped.append(k)
            continue
        else:
            continue
        resized[k] = (tuple(v.shape), tuple(state[k].shape))
    # A head is replaced as a whole: its bias goes with its weight.
    if dropped:
        for k in _HEAD_KEYS:
            if k in state and k not in dropped:
                del state[k]
                dropped.append(k)
    return resized, sorted(dropped)


def shape_mismatches(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> list[str]:
    """``key: checkpoint (shape) vs model (shape)`` for every shared key whose shapes differ."""
    return [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and hasattr(v, "shape") and v.shape != expected[k].shape
    ]


def load_pretrained(
    model: nn.Module, source: str | Path | Mapping, strict: bool = True, adapt: bool = False
) -> LoadReport:
    """Load official / timm / torchvision / swin_lightning weights into ``model``.

    Args:
        model: A :class:`~swin_lightning.models.SwinTransformer`.
        source: A weights file (``.pth``, ``.pt``, ``.bin``, ``.ckpt``, ``.safetensors``) or a
            state dict in any supported layout.
        strict: Raise if the checkpoint lacks some of the model's keys or has extra ones (a
            head replaced by ``adapt`` does not count as missing).
        adapt: Fine-tuning: resize relative position bias tables (another window size) and
            the absolute position embedding (another patch grid) with bicubic interpolation,
            and keep the model's freshly initialised head when the class count differs. The
            report lists what was adapted. Any other shape mismatch raises, listing every
            mismatched key.
    """
    raw = read_state_dict(source) if isinstance(source, str | Path) else source
    state, layout = convert_state_dict(raw, model)
    trim = getattr(model, "trim_state_dict", None)
    if trim is not None:  # a backbone: the classifier's final norm, head, later stages go
        state = trim(state)
    expected = model.state_dict()
    resized, reinitialized = _adapt(state, model, expected) if adapt else ({}, [])
    if adapt and not any(k in state for k in _HEAD_KEYS):  # a headless encoder (SimMIM)
        reinitialized = sorted({*reinitialized, *(k for k in _HEAD_KEYS if k in expected)})
    mismatched = shape_mismatches(state, expected)
    if mismatched:
        hint = (
            ""
            if adapt
            else "\n(fine-tuning to another window size, image size or class count: "
            "adapt=True resizes position tables and replaces the head)"
        )
        conv_stem = isinstance(getattr(model.patch_embed, "stem", None), nn.Sequential)
        if conv_stem and any(m.startswith("patch_embed.") for m in mismatched):
            hint += (
                "\n(the model has stem: conv; released weights have the paper's patch "
                "embedding: set model.net.stem: patch to load them)"
            )
        raise ValueError(
            f"checkpoint ({layout} layout) does not fit the model; mismatched shapes:\n  "
            + "\n  ".join(mismatched)
            + hint
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in reinitialized]
    report = LoadReport(layout, missing, list(result.unexpected_keys), resized, reinitialized)
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"checkpoint does not match the model (strict=True):\n{report}")
    if report.missing or report.unexpected or report.adapted:
        log.warning("%s", report)
    else:
        log.info("%s", report)
    return report
