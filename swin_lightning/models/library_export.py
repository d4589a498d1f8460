"""A network of ours as timm's, torchvision's or Hugging Face's own model: the library's model
of the same shape, holding our weights in its key layout, or the reason that library cannot
express the network.

The networks compute the same function (the package's equivalence tests), so the library
model gives our logits. :func:`library_model` returns it; ``export --format timm|hf|
torchvision`` saves it with the library's own writer and checks it after reading it back.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from swin_lightning.models.swin import SwinTransformer, validate_v2_switches

LIBRARIES = ("timm", "torchvision", "hf")
_DERIVED = ("relative_position_index", "relative_coords_table", "attn_mask")
_V1 = {"pos_embed": "rel", "attention": "dot", "block_norm": "pre", "merge_norm": "pre"}
_V2 = {"pos_embed": "cpb", "attention": "cosine", "block_norm": "post", "merge_norm": "post"}
# Settings every library's Swin has at this value only.
_FIXED = {
    "stem": "patch",
    "shift": True,
    "patch_norm": True,
    "qkv_bias": True,
    "in_chans": 3,
    "mixer": "attention",
}


class NotExpressible(ValueError):
    """The library has no model with this network's shape: which setting, and why."""


def swin_version(net: SwinTransformer, library: str) -> int:
    """1 or 2: the Swin version ``net`` is in every switch, or :class:`NotExpressible`."""
    args = net.init_args
    for key, value in _FIXED.items():
        if args.get(key, value) != value:
            raise NotExpressible(f"{library} has no Swin with {key}={args[key]!r} (only "
                                 f"{key}={value!r}): export it as onnx or pt2 instead")  # fmt: skip
    switches = {k: args.get(k, _V1[k]) for k in _V1}
    for version, values in ((1, _V1), (2, _V2)):
        if switches == values:  # (a V1 network has no pretrained window: the model refuses it)
            return version
    shown = ", ".join(f"{k}={v!r}" for k, v in switches.items())
    raise NotExpressible(
        f"{library}'s Swin is V1 ({_settings(_V1)}) or V2 ({_settings(_V2)}); this network has "
        f"{shown}: export it as onnx or pt2 instead"
    )


def _settings(values: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _pretrained_windows(args: dict[str, Any]) -> list[int]:
    """The network's pretrained window size per stage (0: its own), as the model reads it."""
    return validate_v2_switches(
        len(args["depths"]), args.get("pos_embed", "rel"), args.get("attention", "dot"),
        args.get("block_norm", "pre"), args.get("merge_norm", "pre"),
        args.get("pretrained_window_size", 0),
    )  # fmt: skip


def _weights(net: SwinTransformer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items() if not k.endswith(_DERIVED)}


def _fill(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """Load ``weights`` into ``model``: every parameter must come from them; the model's own
    derived buffers (position indices, coordinate tables, masks) stay."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights and not k.endswith(_DERIVED)]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        raise NotExpressible(f"the weights do not map onto the library's model: missing "
                             f"{missing[:4]}, unexpected {unexpected[:4]}")  # fmt: skip
    model.load_state_dict({**own, **weights})
    return model.eval()


# ---------------------------------------------------------------------------------- timm
def timm_model(net: SwinTransformer) -> tuple[nn.Module, str, dict[str, Any]]:
    """timm's Swin of the same shape with our weights, its architecture name and the
    ``model_args`` that ``timm.create_model`` needs with that name."""
    import timm

    version = swin_version(net, "timm")
    args = net.init_args
    arch = "swin_tiny_patch4_window7_224" if version == 1 else "swinv2_tiny_window8_256"
    model_args = {
        "img_size": list(net.img_size), "patch_size": args["patch_size"],
        "embed_dim": args["embed_dim"], "depths": list(args["depths"]),
        "num_heads": list(args["num_heads"]), "window_size": args["window_size"],
        "mlp_ratio": args["mlp_ratio"], "num_classes": net.num_classes,
    }  # fmt: skip
    if version == 2:
        model_args["pretrained_window_sizes"] = _pretrained_windows(args)
    model = timm.create_model(arch, pretrained=False, **model_args)
    weights = {re.sub(r"^head\.", "head.fc.", k): v for k, v in _weights(net).items()}
    return _fill(model, weights), arch, model_args


# --------------------------------------------------------------------------- torchvision
def torchvision_kwargs(net: SwinTransformer) -> tuple[int, dict[str, Any]]:
    """The Swin version and the arguments of torchvision's ``SwinTransformer`` class (V2:
    with its V2 block and merging, which :func:`torchvision_model` adds)."""
    version = swin_version(net, "torchvision")
    args = net.init_args
    if version == 2 and any(_pretrained_windows(args)):
        raise NotExpressible("torchvision's Swin V2 has no pretrained_window_size (window "
                             "transfer): export it as timm or hf instead")  # fmt: skip
    return version, {
        "patch_size": [args["patch_size"]] * 2, "embed_dim": args["embed_dim"],
        "depths": list(args["depths"]), "num_heads": list(args["num_heads"]),
        "window_size": [args["window_size"]] * 2, "mlp_ratio": args["mlp_ratio"],
        "num_classes": net.num_classes,
    }  # fmt: skip


def build_torchvision(version: int, kwargs: dict[str, Any]) -> nn.Module:
    """torchvision's Swin (V1 or V2) from :func:`torchvision_kwargs`, fresh weights."""
    from torchvision.models import swin_transformer as tv

    extra = {"block": tv.SwinTransformerBlockV2, "downsample_layer": tv.PatchMergingV2}
    return tv.SwinTransformer(**kwargs, **(extra if version == 2 else {}))


def torchvision_model(net: SwinTransformer) -> tuple[nn.Module, int, dict[str, Any]]:
    """torchvision's Swin with our weights, and how to build it again (version, kwargs)."""
    version, kwargs = torchvision_kwargs(net)
    weights = _weights(net)
    out = {}
    for k, v in weights.items():
        if m := re.match(r"patch_embed\.(proj|norm)\.(.*)", k):
            k = f"features.0.{0 if m[1] == 'proj' else 2}.{m[2]}"
        elif m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.*)", k):
            rest = m[3].replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.3.")
            prefix = f"features.{2 * int(m[1]) + 1}.{m[2]}."
            if rest == "attn.v_bias":
                continue
            if rest == "attn.q_bias":  # torchvision V2 keeps one qkv bias (its key third: 0)
                v = torch.cat([v, torch.zeros_like(v), weights[k.replace("q_bias", "v_bias")]])
                rest = "attn.qkv.bias"
            k = prefix + rest
        elif m := re.match(r"layers\.(\d+)\.downsample\.(.*)", k):
            k = f"features.{2 * int(m[1])}.{m[2]}"
        out[k] = v
    return _fill(build_torchvision(version, kwargs), out), version, kwargs


# --------------------------------------------------------------------------- Hugging Face
def hf_model(net: SwinTransformer, classes: Sequence[str] = ()) -> nn.Module:
    """Hugging Face's ``SwinForImageClassification`` (V1) or ``Swinv2ForImageClassification``
    (V2) with our weights; ``id2label`` from ``classes``."""
    import transformers

    version = swin_version(net, "Hugging Face transformers")
    args = net.init_args
    h, w = net.img_size
    if h != w:
        raise NotExpressible(f"Hugging Face's Swin takes square images; this one is {h}x{w}")
    labels = [str(c) for c in classes] or [f"LABEL_{i}" for i in range(net.num_classes)]
    if len(labels) != net.num_classes:
        raise NotExpressible(f"{len(labels)} class names for {net.num_classes} classes")
    common = {
        "image_size": h, "patch_size": args["patch_size"], "num_channels": 3,
        "embed_dim": args["embed_dim"], "depths": list(args["depths"]),
        "num_heads": list(args["num_heads"]), "window_size": args["window_size"],
        "mlp_ratio": args["mlp_ratio"], "qkv_bias": True, "drop_path_rate": 0.0,
        "hidden_act": "gelu", "layer_norm_eps": 1e-5, "use_absolute_embeddings": False,
        "id2label": dict(enumerate(labels)), "label2id": {c: i for i, c in enumerate(labels)},
    }  # fmt: skip
    if version == 1:
        model = transformers.SwinForImageClassification(transformers.SwinConfig(**common))
        prefix = "swin."
    else:
        config = transformers.Swinv2Config(
            **common, pretrained_window_sizes=_pretrained_windows(args)
        )
        model = transformers.Swinv2ForImageClassification(config)
        prefix = "swinv2."
    own = set(model.state_dict())
    return _fill(model, _to_hf(_weights(net), prefix, own, len(args["depths"])))


def _pick(own: set[str], *names: str) -> str:
    """The first of ``names`` the model has (its layout changes between transformers
    versions)."""
    return next((n for n in names if n in own), names[0])


def _to_hf(weights: dict[str, torch.Tensor], prefix: str, own: set[str], stages: int) -> dict:
    out: dict[str, torch.Tensor] = {}
    enc = f"{prefix}encoder.layers."
    for k, v in weights.items():
        if m := re.match(r"patch_embed\.(proj|norm)\.(.*)", k):
            part = "patch_embeddings.projection" if m[1] == "proj" else "norm"
            out[f"{prefix}embeddings.{part}.{m[2]}"] = v
        elif m := re.match(r"layers\.(\d+)\.downsample\.(.*)", k):  # HF: at the stage's end
            out[f"{enc}{int(m[1]) - 1}.downsample.{m[2]}"] = v
        elif m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.*)", k):
            _block_to_hf(out, f"{enc}{m[1]}.blocks.{m[2]}.", m[3], v, weights, k, own)
        elif k.startswith("norm."):
            out[f"{prefix}layernorm.{k[5:]}"] = v
        elif k.startswith("head."):
            out[f"classifier.{k[5:]}"] = v
        else:
            raise NotExpressible(f"no Hugging Face key for {k}")
    return out


def _block_to_hf(out: dict, block: str, rest: str, v: torch.Tensor, weights: dict, key: str,
                 own: set[str]) -> None:  # fmt: skip
    a = f"{block}attention."
    query = _pick(own, f"{a}q_proj.weight", f"{a}self.query.weight").rsplit(".", 1)[0]
    keys = _pick(own, f"{a}k_proj.weight", f"{a}self.key.weight").rsplit(".", 1)[0]
    value = _pick(own, f"{a}v_proj.weight", f"{a}self.value.weight").rsplit(".", 1)[0]
    simple = {
        "norm1": f"{block}layernorm_before", "norm2": f"{block}layernorm_after",
        "attn.proj": _pick(own, f"{a}o_proj.weight", f"{a}output.dense.weight").rsplit(".", 1)[0],
        "mlp.fc1": _pick(own, f"{block}mlp.fc1.weight", f"{block}intermediate.dense.weight")
        .rsplit(".", 1)[0],
        "mlp.fc2": _pick(own, f"{block}mlp.fc2.weight", f"{block}output.dense.weight")
        .rsplit(".", 1)[0],
    }  # fmt: skip
    module, _, leaf = rest.rpartition(".")
    if module in simple:
        out[f"{simple[module]}.{leaf}"] = v
    elif rest in ("attn.qkv.weight", "attn.qkv.bias"):
        for name, part in zip((query, keys, value), v.chunk(3), strict=True):
            out[f"{name}.{leaf}"] = part
    elif rest == "attn.q_bias":
        out[f"{query}.bias"] = v
    elif rest == "attn.v_bias":
        out[f"{value}.bias"] = v
    elif rest == "attn.relative_position_bias_table":
        out[_pick(own, f"{a}relative_position_bias.relative_position_bias_table",
                  f"{a}self.relative_position_bias_table")] = v  # fmt: skip
    elif rest == "attn.logit_scale":
        out[f"{a}self.logit_scale"] = v
    elif rest.startswith("attn.cpb_mlp."):
        out[f"{a}self.continuous_position_bias_mlp.{rest.removeprefix('attn.cpb_mlp.')}"] = v
    else:
        raise NotExpressible(f"no Hugging Face key for {key}")
