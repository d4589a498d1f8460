"""A network as plain data, and back: what a checkpoint stores so that the model loads with
no config file (``SwinClassifier.load_from_checkpoint(path)``).

A checkpoint of a run holds, beside Lightning's own entries:

- ``swin_lightning_net``: ``{"class_path": ..., "init_args": {...}}``, the network's class (one
  of this package's networks) and the arguments it was built with, as plain numbers,
  strings and lists, so ``torch.load(..., weights_only=True)`` reads it;
- ``swin_lightning_data``: the evaluation transform of the data it was trained on, as timm's
  data config (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``), and the
  class names.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from torch import nn

from swin_lightning.storage import CheckpointError, load_checkpoint

NET_KEY = "swin_lightning_net"
DATA_KEY = "swin_lightning_data"
# Only networks of this package are built from a checkpoint (a class path read from a file
# names code to run).
_ALLOWED_PREFIX = "swin_lightning.models."


def net_spec(net: nn.Module) -> dict[str, Any]:
    """``net``'s class path and the arguments it was built with (its ``init_args``)."""
    net = getattr(net, "_orig_mod", net)  # torch.compile's wrapper: the network inside
    init_args = getattr(net, "init_args", None)
    if init_args is None:
        raise TypeError(f"{type(net).__name__} records no init_args: it cannot be saved as data")
    return {"class_path": f"{type(net).__module__}.{type(net).__qualname__}",
            "init_args": dict(init_args)}  # fmt: skip


def build_net(spec: dict[str, Any]) -> nn.Module:
    """The network a :func:`net_spec` describes (fresh weights)."""
    class_path = str(spec.get("class_path", ""))
    if not class_path.startswith(_ALLOWED_PREFIX):
        raise CheckpointError(f"network class {class_path!r} is not one of swin_lightning's")
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**spec.get("init_args", {}))


def spec_of_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The network spec and data config a checkpoint holds; a checkpoint written before they
    were stored is refused with what to do instead."""
    checkpoint = load_checkpoint(path, mmap=True)
    if NET_KEY not in checkpoint:
        run_dir = Path(path).resolve().parent.parent
        raise CheckpointError(
            f"{path} was written before checkpoints held their network (swin_lightning 0.1): "
            f"load it with swin_lightning.load_model('{run_dir}'), which rebuilds the network "
            "from the run's config.yaml, or pass net=... to load_from_checkpoint"
        )
    return checkpoint[NET_KEY], checkpoint.get(DATA_KEY)


def data_record(datamodule: Any) -> dict[str, Any]:
    """What a checkpoint stores of its data: the evaluation transform as timm's data config
    (``eval_transform``) and the class names in label order (``classes``)."""
    return {"eval_transform": datamodule.eval_config(),
            "classes": [str(c) for c in getattr(datamodule, "classes", None) or []]}  # fmt: skip


class SelfContainedCheckpoint:
    """Mixin of the LightningModules: checkpoints carry the network spec and the data's
    evaluation transform, and ``load_from_checkpoint(path)`` needs nothing else."""

    net: nn.Module

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[NET_KEY] = net_spec(self.net)
        trainer = getattr(self, "_trainer", None)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "eval_config"):
            checkpoint[DATA_KEY] = data_record(datamodule)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):  # type: ignore[override]
        """Lightning's ``load_from_checkpoint``; the network is rebuilt from the checkpoint
        (pass ``net=`` to give your own)."""
        if "net" not in kwargs:
            spec, _ = spec_of_checkpoint(checkpoint_path)
            kwargs["net"] = build_net(spec)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
