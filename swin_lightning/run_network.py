"""A run's network rebuilt outside training: from its self-contained checkpoint or from the
run's ``config.yaml``, with the checkpoint's weights, and the data record (evaluation
transform, class names) of the run. What ``export``, ``load_model`` and ``analyze`` share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from swin_lightning.models import SwinTransformer
from swin_lightning.models.net_spec import NET_KEY, data_record
from swin_lightning.storage import CheckpointError


class ExportError(RuntimeError):
    """The checkpoint or its run cannot be exported, or the export differs from PyTorch."""


def run_config(ckpt_path: Path, config: str | None) -> dict[str, Any]:
    """The run's resolved config: ``--config``, else ``<run>/config.yaml`` beside
    ``<run>/checkpoints/``."""
    path = Path(config) if config else ckpt_path.resolve().parent.parent / "config.yaml"
    if not path.is_file():
        raise ExportError(
            f"no run config at {path} (the checkpoint's run folder); pass --config with the "
            "YAML the run was trained with"
        )
    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict) or "net" not in (loaded.get("model") or {}):
        raise ExportError(f"{path} has no model.net section: not a swin_lightning run config")
    return loaded


def _weights_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    weights = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    if "head.weight" not in weights:
        raise ExportError("the checkpoint holds no network weights (no net.head.weight)")
    return weights


def _size(size: int | list[int]) -> tuple[int, int]:
    size = [size, size] if isinstance(size, int) else list(size)
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


def _loaded(init_args: dict[str, Any], weights: dict[str, torch.Tensor]) -> SwinTransformer:
    net = SwinTransformer(**{**init_args, "num_classes": weights["head.weight"].shape[0]})
    check_weights(net.state_dict(), weights)
    net.load_state_dict(weights)
    return net.eval()


def build_network(
    config: dict[str, Any], state: dict[str, torch.Tensor], image_size: list[int] | None
) -> SwinTransformer:
    """The run's network with the checkpoint's weights, in eval mode."""
    net_cfg = config["model"]["net"]
    init_args = dict(net_cfg.get("init_args") or {})
    weights = _weights_of(state)
    data_args = (config.get("data") or {}).get("init_args") or {}
    size = image_size or data_args.get("image_size")
    if size is None and "CIFAR" in str((config.get("data") or {}).get("class_path", "")):
        size = 32
    if size is None:
        raise ExportError("the run's data sets no image_size; pass --image_size H [W]")
    return _loaded({**init_args, "img_size": _size(size)}, weights)


def network_of_checkpoint(
    checkpoint: dict[str, Any], image_size: list[int] | None
) -> SwinTransformer:
    """The network a self-contained checkpoint describes, with its weights, in eval mode
    (``image_size``: another input size than it was trained at)."""
    spec = checkpoint[NET_KEY]
    if not str(spec.get("class_path", "")).endswith(".SwinTransformer"):
        raise ExportError(f"export takes a SwinTransformer, not {spec.get('class_path')}")
    init_args = dict(spec.get("init_args") or {})
    if image_size:
        init_args["img_size"] = _size(image_size)
    return _loaded(init_args, _weights_of(checkpoint["state_dict"]))


def datamodule_from_config(config: dict[str, Any]):
    """The run's data module, built as its config says (one of swin_lightning's classes)."""
    import importlib

    data = config.get("data") or {}
    module, _, name = str(data.get("class_path", "")).rpartition(".")
    if not module.startswith("swin_lightning.data"):
        raise CheckpointError(f"the run's data class {data.get('class_path')!r} is not one of "
                              "swin_lightning's")  # fmt: skip
    try:
        return getattr(importlib.import_module(module), name)(**(data.get("init_args") or {}))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"the run's data module cannot be built here ({err})") from None


def data_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """The data record of a run (evaluation transform, class names) from its data module
    built as configured: for checkpoints written before they held it."""
    return data_record(datamodule_from_config(config))


def check_weights(expected: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    """An :class:`ExportError` naming the first keys the config's network and the checkpoint
    disagree on (missing, unexpected, or of another shape, with both shapes)."""
    problems = [f"{k}: the checkpoint has {tuple(weights[k].shape)}, the config's network "
                f"{tuple(v.shape)}" for k, v in expected.items()
                if k in weights and weights[k].shape != v.shape]  # fmt: skip
    problems += [f"{k}: missing from the checkpoint" for k in expected if k not in weights]
    problems += [f"{k}: not in the config's network" for k in weights if k not in expected]
    if problems:
        shown = "; ".join(problems[:4]) + (
            f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
        )
        raise ExportError(
            f"the checkpoint's weights do not fit the network of the config ({len(problems)} "
            f"keys differ: {shown}); pass --config with the YAML of the run that wrote the "
            "checkpoint (its run folder's config.yaml)"
        )
