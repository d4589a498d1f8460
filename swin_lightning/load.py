"""``swin_lightning.load_model``: a trained network out of a run, in eval mode, with the
transform its evaluation used, for notebooks and deployment code.

    from swin_lightning import load_model
    model = load_model("logs/demo/version_0")          # or a .ckpt file
    probs = model.net(model.transform(image).unsqueeze(0)).softmax(-1)

Checkpoints hold their network and data config (:mod:`swin_lightning.models.net_spec`);
an older checkpoint is rebuilt from its run's ``config.yaml``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swin_lightning.models.net_spec import DATA_KEY, NET_KEY, build_net
from swin_lightning.protocol import CHECKPOINTS, LAST_CKPT
from swin_lightning.run_network import ExportError, build_network, data_from_config, run_config
from swin_lightning.storage import CheckpointError, load_checkpoint


@dataclass
class TrainedModel:
    """A trained network and what it needs to be used.

    Attributes:
        net: The network, in eval mode (a SimMIM encoder has no head: it gives features).
        transform: PIL image -> normalized tensor, as the run's evaluation did.
        data_config: That transform as timm's data config (input_size, interpolation, mean,
            std, crop_pct).
        classes: Class names in label order (empty when the run's data had none).
        checkpoint: The checkpoint the weights came from.
    """

    net: nn.Module
    transform: Callable[[Any], torch.Tensor]
    data_config: dict[str, Any]
    classes: list[str] = field(default_factory=list)
    checkpoint: Path | None = None


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or a run folder's ``checkpoints/last.ckpt``."""
    path = Path(path)
    if path.is_dir():
        last = path / CHECKPOINTS / LAST_CKPT
        if not last.is_file():
            raise FileNotFoundError(f"{path} is a folder without {CHECKPOINTS}/{LAST_CKPT}: "
                                    "give a run folder or a .ckpt file")  # fmt: skip
        return last
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint or run folder")
    return path


def load_model(path: str | Path, map_location: Any = "cpu") -> TrainedModel:
    """The trained network of a run folder (its ``last.ckpt``) or a checkpoint file, in eval
    mode, with its evaluation transform and class names (see :class:`TrainedModel`)."""
    from timm.data import create_transform

    ckpt = find_checkpoint(path)
    checkpoint = load_checkpoint(ckpt, map_location=map_location)
    state = checkpoint.get("state_dict") or {}
    weights = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    if NET_KEY in checkpoint:
        net = build_net(checkpoint[NET_KEY])
        if "head.weight" not in weights:  # a SimMIM encoder: features, no classes
            net.head, net.num_classes = nn.Identity(), 0
        net.load_state_dict(weights)
        data = checkpoint.get(DATA_KEY) or {}
    else:  # written before checkpoints held their network: the run's config.yaml
        try:
            config = run_config(ckpt, None)
        except ExportError as err:
            raise CheckpointError(f"{ckpt} holds no network spec (an older checkpoint) and "
                                  f"{err}") from None  # fmt: skip
        net = build_network(config, state, None)
        data = data_from_config(config)
    eval_config = data.get("eval_transform")
    if not eval_config:
        raise CheckpointError(f"{ckpt} records no evaluation transform of its data")
    transform = create_transform(**eval_config, is_training=False)
    return TrainedModel(net.eval(), transform, eval_config, list(data.get("classes") or []), ckpt)
