"""Swin-MLP as ``model.net.mixer: mlp``: equal to the official code, its presets, its refusals,
and the places the attention model goes (export, features, SimMIM, bf16, pictures)."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from swin_lightning.models import SwinTransformer, create_model, load_pretrained
from swin_lightning.models.flops import count_macs

# The reference: the official models/swin_mlp.py (github.com/microsoft/Swin-Transformer) when
# SWIN_OFFICIAL_REPO names a checkout of it (it is not part of this repository, and the tests
# run offline); otherwise the small functional re-typing below, written from the official
# block's description: pre-norm, shifted windows by zero padding (window - shift before, shift
# after, no roll and no mask), per head a linear map over the window's tokens, patch merging
# at the end of a stage, the official state-dict layout.
OFFICIAL = os.environ.get("SWIN_OFFICIAL_REPO")


def official_model(**kwargs):
    spec = importlib.util.spec_from_file_location(
        "official_swin_mlp", Path(OFFICIAL) / "models" / "swin_mlp.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SwinMLP(**kwargs).eval()


class RetypedSwinMLP:
    """The official Swin-MLP's forward over a state dict in the official key layout."""

    def __init__(self, img_size, embed_dim, depths, num_heads, window_size, num_classes, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.cfg = (img_size, embed_dim, depths, num_heads, window_size)
        s: dict[str, torch.Tensor] = {}

        def rand(*shape):
            return torch.randn(*shape, generator=g) * 0.05

        def ln(key, dim):
            s[f"{key}.weight"], s[f"{key}.bias"] = 1 + rand(dim), rand(dim)

        s["patch_embed.proj.weight"], s["patch_embed.proj.bias"] = rand(embed_dim, 3, 4, 4), rand(embed_dim)  # fmt: skip
        ln("patch_embed.norm", embed_dim)
        res = img_size // 4
        for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            dim = embed_dim * 2**i
            ws = min(window_size, res)
            for j in range(depth):
                b = f"layers.{i}.blocks.{j}"
                ln(f"{b}.norm1", dim)
                s[f"{b}.spatial_mlp.weight"] = rand(heads * ws * ws, ws * ws, 1)
                s[f"{b}.spatial_mlp.bias"] = rand(heads * ws * ws)
                ln(f"{b}.norm2", dim)
                s[f"{b}.mlp.fc1.weight"], s[f"{b}.mlp.fc1.bias"] = rand(4 * dim, dim), rand(4 * dim)  # fmt: skip
                s[f"{b}.mlp.fc2.weight"], s[f"{b}.mlp.fc2.bias"] = rand(dim, 4 * dim), rand(dim)  # fmt: skip
            if i < len(depths) - 1:
                ln(f"layers.{i}.downsample.norm", 4 * dim)
                s[f"layers.{i}.downsample.reduction.weight"] = rand(2 * dim, 4 * dim)
                res //= 2
        ln("norm", embed_dim * 2 ** (len(depths) - 1))
        s["head.weight"], s["head.bias"] = rand(num_classes, embed_dim * 2 ** (len(depths) - 1)), rand(num_classes)  # fmt: skip
        self.state = s

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s, (_, _, depths, num_heads, window_size) = self.state, self.cfg

        def ln(key, t):
            return F.layer_norm(t, t.shape[-1:], s[f"{key}.weight"], s[f"{key}.bias"])

        x = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=4)
        x = ln("patch_embed.norm", x.permute(0, 2, 3, 1))  # (B, H, W, C)
        for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            B, H, W, C = x.shape
            ws = min(window_size, H)
            for j in range(depth):
                b = f"layers.{i}.blocks.{j}"
                shift = ws // 2 if j % 2 == 1 and window_size < H else 0
                y = ln(f"{b}.norm1", x)
                if shift:
                    y = F.pad(y, (0, 0, ws - shift, shift, ws - shift, shift))
                Hp, Wp = y.shape[1:3]
                weight = s[f"{b}.spatial_mlp.weight"].view(heads, ws * ws, ws * ws)
                bias = s[f"{b}.spatial_mlp.bias"].view(heads, ws * ws, 1)
                out = torch.zeros_like(y)
                for r in range(0, Hp, ws):
                    for c in range(0, Wp, ws):
                        win = y[:, r : r + ws, c : c + ws].reshape(B, ws * ws, heads, C // heads)
                        mixed = torch.einsum("hnm,bmhd->bnhd", weight, win) + bias.permute(1, 0, 2)
                        out[:, r : r + ws, c : c + ws] = mixed.reshape(B, ws, ws, C)
                if shift:
                    out = out[:, ws - shift : ws - shift + H, ws - shift : ws - shift + W]
                x = x + out
                h = F.gelu(F.linear(ln(f"{b}.norm2", x), s[f"{b}.mlp.fc1.weight"], s[f"{b}.mlp.fc1.bias"]))  # fmt: skip
                x = x + F.linear(h, s[f"{b}.mlp.fc2.weight"], s[f"{b}.mlp.fc2.bias"])
            if i < len(depths) - 1:
                parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
                x = ln(f"layers.{i}.downsample.norm", torch.cat(parts, -1))
                x = F.linear(x, s[f"layers.{i}.downsample.reduction.weight"])
        x = ln("norm", x).mean(dim=(1, 2))
        return F.linear(x, s["head.weight"], s["head.bias"])


SHAPES = {  # the official configs' shapes, and a small one with two stages
    "t_c24_256_w8": dict(img_size=256, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[4, 8, 16, 32], window_size=8),
    "t_c12_256_w8": dict(img_size=256, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[8, 16, 32, 64], window_size=8),
    "t_c6_256_w8": dict(img_size=256, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[16, 32, 64, 128], window_size=8),
    "b_224_w7": dict(img_size=224, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=7),
    "small_64_w4": dict(img_size=64, embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=4),
}  # fmt: skip


@pytest.mark.parametrize("shape", list(SHAPES))
def test_equal_to_the_official_swin_mlp(shape, tmp_path):
    cfg = SHAPES[shape]
    if OFFICIAL:  # the official file itself, random weights saved in its own format
        torch.manual_seed(0)
        reference = official_model(num_classes=10, **cfg)
        for p in reference.parameters():
            p.data.normal_(0, 0.05)
        state = reference.state_dict()
    else:
        if shape.startswith("b_"):
            pytest.skip(
                "the re-typed reference is slow at Swin-MLP-B's size; set SWIN_OFFICIAL_REPO"
            )
        reference = RetypedSwinMLP(num_classes=10, **cfg)
        state = reference.state
    torch.save({"model": state}, tmp_path / "swin_mlp.pth")  # the official checkpoint format
    ours = SwinTransformer(num_classes=10, mixer="mlp", pos_embed="none", **cfg).eval()
    report = load_pretrained(ours, tmp_path / "swin_mlp.pth")
    assert report.missing == [] and report.unexpected == []
    x = torch.randn(2, 3, cfg["img_size"], cfg["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=0)
    assert any(b.shifted for stage in ours.layers for b in stage.blocks)


def test_non_square_input_equals_the_reference_too(tmp_path):
    """A 64x96 image (the official code takes an (H, W) img_size; the re-typed reference's
    loops take any grid the windows tile)."""
    cfg = dict(SHAPES["small_64_w4"])
    if OFFICIAL:
        torch.manual_seed(0)
        reference = official_model(num_classes=10, **{**cfg, "img_size": (64, 96)})
        for p in reference.parameters():
            p.data.normal_(0, 0.05)
        state = reference.state_dict()
    else:
        reference = RetypedSwinMLP(num_classes=10, **cfg)
        state = reference.state
    torch.save({"model": state}, tmp_path / "swin_mlp.pth")
    ours = SwinTransformer(num_classes=10, mixer="mlp", pos_embed="none",
                           **{**cfg, "img_size": (64, 96)}).eval()  # fmt: skip
    load_pretrained(ours, tmp_path / "swin_mlp.pth")
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("name", "params", "gmacs"),
    # the official README: 20M / 21M / 23M and 4.0G at 256; 61M and 10.4G for B at 224
    [
        ("swin_mlp_t_c24", 20.4, 4.03),
        ("swin_mlp_t_c12", 21.2, 4.03),
        ("swin_mlp_t_c6", 22.7, 4.03),
        ("swin_mlp_b", 60.7, 10.41),
    ],
)
def test_presets_have_the_official_size_and_flops(name, params, gmacs):
    net = create_model(name)
    size = net.img_size
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(params, abs=0.05)
    assert count_macs(net, (3, *size)) / 1e9 == pytest.approx(gmacs, abs=0.01)


@pytest.mark.parametrize("setting", [{"attention": "cosine"}, {"qkv_bias": False},
                                     {"pos_embed": "cpb"}])  # fmt: skip
def test_attention_settings_are_refused_for_the_mlp_mixer(setting):
    with pytest.raises(ValueError, match="mixer='mlp' has no attention") as err:
        SwinTransformer(**SHAPES["small_64_w4"], mixer="mlp", **setting)
    assert "\n" not in str(err.value)


def test_a_mixer_typo_is_one_error_line_of_the_cli(capsys):
    from tests.conftest import TINY_DEMO, run_cli

    with pytest.raises(SystemExit) as stop:
        run_cli("fit", *TINY_DEMO, "--model.net.mixer=mlp", "--model.net.attention=cosine")
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "mixer='mlp'" in err


def mlp_net(**overrides) -> SwinTransformer:
    torch.manual_seed(0)
    return SwinTransformer(**{**SHAPES["small_64_w4"], "num_classes": 5, "mixer": "mlp",
                              "pos_embed": "none", **overrides}).eval()  # fmt: skip


def test_export_features_bf16_and_pictures_work_with_the_mlp_mixer(tmp_path):
    from swin_lightning.export import export
    from swin_lightning.models.features import SwinFeatures

    net = mlp_net()
    from swin_lightning.models.library_export import NotExpressible, timm_model

    with pytest.raises(NotExpressible, match="timm has no Swin with mixer='mlp'"):
        timm_model(net)  # no library has Swin-MLP: export refuses in one line
    assert export(net, "pt2", tmp_path / "m.pt2") < 1e-5
    pytest.importorskip("onnxruntime")
    assert export(net, "onnx", tmp_path / "m.onnx") < 1e-4
    features = SwinFeatures(out_indices=(0, 1), **net.init_args)
    features.load_state_dict(net.state_dict(), strict=False)
    maps = features(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 24, 16, 16), (1, 48, 8, 8)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 3, 64, 64))
    assert out.dtype == torch.bfloat16 and out.isfinite().all()
    block = net.layers[0].blocks[1]  # shifted: windows of the padded grid
    x = torch.randn(1, 16, 16, 24)
    probs = block.attention_probs(x)
    assert probs.shape == (1, 25, 2, 16, 16) and torch.allclose(probs.sum(-1), torch.ones(1))
    assert math.isclose(float(block.spatial_weights().abs().sum()),
                        float(block.spatial_mlp.weight.abs().sum()), rel_tol=1e-6)  # fmt: skip


def test_simmim_pretraining_trains_the_mlp_mixer():
    """SimMIM's masked-image loss over the MLP mixer falls when fitting one batch."""
    from swin_lightning.simmim import SimMIM

    torch.manual_seed(0)
    net = SwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=[2, 2],
                          num_heads=[1, 2], window_size=4, num_classes=5, mixer="mlp",
                          pos_embed="none")  # fmt: skip
    module = SimMIM(net, mask_ratio=0.5, mask_patch_size=8).train()
    images = torch.randn(8, 3, 32, 32)
    mask = module.make_mask(8, seed=0)
    optimizer = torch.optim.AdamW(module.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss, _ = module.loss(images, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert module.net.layers[0].blocks[1].spatial_mlp.weight.grad.abs().sum() > 0
    assert losses[-1] < 0.85 * losses[0], losses[::5]
