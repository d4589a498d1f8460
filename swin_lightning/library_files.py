"""A trained network written as timm's, torchvision's or Hugging Face's own files, then read
back with that library alone and checked against our logits (``export --format timm|hf|
torchvision``).

- ``timm``: timm's ``save_for_hf`` folder (``config.json`` with the architecture,
  ``model_args`` and ``pretrained_cfg``: classes, input size, mean/std, crop;
  ``model.safetensors``); ``timm.create_model("local-dir:FOLDER", pretrained=True)`` reads it.
- ``hf``: ``save_pretrained`` of ``SwinForImageClassification`` or
  ``Swinv2ForImageClassification`` (``config.json`` with ``id2label``; ``model.safetensors``);
  ``AutoModelForImageClassification.from_pretrained(FOLDER)`` reads it.
- ``torchvision``: torchvision's ``SwinTransformer`` state dict as ``model.safetensors`` and a
  ``config.json`` with the constructor's arguments (:func:`read_torchvision` is the few lines
  that build it; docs/export.md shows them).

The folder is written beside ``out`` and moved into place once it has passed its check.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swin_lightning.models import SwinTransformer
from swin_lightning.models.library_export import hf_model, timm_model, torchvision_model
from swin_lightning.storage import WriteError

CHECK_BATCHES = (1, 3)


def read_torchvision(folder: str | Path) -> nn.Module:
    """torchvision's Swin from a ``--format torchvision`` folder (torchvision and safetensors
    only)."""
    from safetensors.torch import load_file
    from torchvision.models import swin_transformer as tv

    config = json.loads((Path(folder) / "config.json").read_text())
    v2 = {"block": tv.SwinTransformerBlockV2, "downsample_layer": tv.PatchMergingV2}
    model = tv.SwinTransformer(**config["kwargs"], **(v2 if config["swin_version"] == 2 else {}))
    model.load_state_dict(load_file(Path(folder) / "model.safetensors"))
    return model.eval()


def _write(net: SwinTransformer, fmt: str, folder: Path, data: dict[str, Any]) -> nn.Module:
    """Write the files into ``folder``; returns the model read back from them."""
    eval_config = data.get("eval_transform") or {}
    classes = list(data.get("classes") or [])
    if fmt == "timm":
        import timm
        from timm.models import save_for_hf

        model, _, model_args = timm_model(net)
        labels = {"label_names": classes} if len(classes) == net.num_classes else {}
        save_for_hf(model, str(folder), model_config=labels, model_args=model_args,
                    data_config=eval_config or None, safe_serialization=True)  # fmt: skip
        return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    if fmt == "hf":
        from transformers import AutoModelForImageClassification

        hf_model(net, classes).save_pretrained(str(folder), safe_serialization=True)
        return AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    from safetensors.torch import save_file

    model, version, kwargs = torchvision_model(net)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))  # fmt: skip
    config = {"library": "torchvision", "swin_version": version, "kwargs": kwargs,
              "data_config": eval_config, "classes": classes}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return read_torchvision(folder)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


class LibraryMismatch(ValueError):
    """The files read back by the library give other logits than the network."""


def write_library_files(
    net: SwinTransformer,
    fmt: str,
    out: Path,
    data: dict[str, Any] | None = None,
    tolerance: float = 1e-4,
) -> float:
    """Write ``net`` as ``fmt`` into the folder ``out`` (replacing it), read it back with the
    library and return the largest logit difference to ``net`` over batches of 1 and 3.
    Above ``tolerance`` nothing is put at ``out`` (:class:`LibraryMismatch`)."""
    if fmt == "hf":
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise ImportError("--format hf needs transformers: pip install "
                              "'swin_lightning[hf]'") from None  # fmt: skip
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise WriteError(
            out, NotADirectoryError(20, f"a file is there; --format {fmt} writes a folder")
        )
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        model = _write(net, fmt, staging, data or {})
        h, w = net.img_size
        diff = 0.0
        with torch.no_grad():
            for n in CHECK_BATCHES:
                x = torch.randn(n, 3, h, w)
                diff = max(diff, (_logits(model, x) - net(x)).abs().max().item())
        if diff > tolerance:
            raise LibraryMismatch(f"{fmt} gives logits {diff:.2e} away from the network's "
                                  f"(tolerance {tolerance:g}); nothing was written to {out}")  # fmt: skip
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except WriteError:
        raise
    except OSError as err:
        raise WriteError(out, err) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return diff
