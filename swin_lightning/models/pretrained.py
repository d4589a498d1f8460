"""Load Swin weights from the official, timm, torchvision or this project's layout, safely.

Files are read with ``torch.load(weights_only=True)`` or safetensors: a checkpoint is never
unpickled into arbitrary objects, so a crafted file cannot run code.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
# Buffers that the reference implementations save but this model derives from its shape.
_DERIVED_BUFFERS = ("relative_position_index", "attn_mask")
# Containers that training scripts wrap state dicts in (official: "model", Lightning: "state_dict").
_WRAPPER_KEYS = ("state_dict", "model", "model_ema", "state_dict_ema")
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: the layout it recognised and any keys left over."""

    layout: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded weights in {self.layout} layout"]
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
        raise FileNotFoundError(f"pretrained weights not found: {path}")
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
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
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
            v = v.reshape(1, *model.patch_grid, v.shape[-1])
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
            rest = m[3].replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
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


def load_pretrained(
    model: nn.Module, source: str | Path | Mapping, strict: bool = True
) -> LoadReport:
    """Load official / timm / torchvision / swin_lightning weights into ``model``.

    Args:
        model: A :class:`~swin_lightning.models.SwinTransformer`.
        source: A weights file (``.pth``, ``.pt``, ``.bin``, ``.ckpt``, ``.safetensors``) or a
            state dict in any supported layout.
        strict: Raise if the checkpoint lacks some of the model's keys or has extra ones.
            Shape mismatches always raise, listing every mismatched key.
    """
    raw = read_state_dict(source) if isinstance(source, str | Path) else source
    state, layout = convert_state_dict(raw, model)
    expected = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if mismatched:
        raise ValueError(
            f"checkpoint ({layout} layout) does not fit the model; mismatched shapes:\n  "
            + "\n  ".join(mismatched)
        )
    result = model.load_state_dict(state, strict=False)
    report = LoadReport(layout, list(result.missing_keys), list(result.unexpected_keys))
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"checkpoint does not match the model (strict=True):\n{report}")
    if report.missing or report.unexpected:
        log.warning("%s", report)
    return report
