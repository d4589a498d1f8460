"""Shapes, parameter counts, FLOPs and settings of the from-scratch Swin."""

import re

import pytest
import torch
import torch.nn.functional as F

from swin_lightning.models import SwinTransformer, count_macs, create_model
from tests.conftest import CONFIGS

# timm's parameter counts for the same shapes (swin_{tiny,small,base,large}_patch4_window7_224).
TIMM_PARAMS = {
    "swin_t": 28_288_354,
    "swin_s": 49_606_258,
    "swin_b": 87_768_224,
    "swin_l": 196_532_476,
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(TIMM_PARAMS))
def test_parameter_count_equals_timm(name):
    assert n_params(create_model(name)) == TIMM_PARAMS[name]


def test_stage_shapes_at_224():
    model = create_model("swin_t").eval()
    with torch.no_grad():
        outs = model.forward_intermediates(torch.randn(1, 3, 224, 224))
    assert [tuple(o.shape[1:]) for o in outs] == [
        (56, 56, 96),
        (28, 28, 192),
        (14, 14, 384),
        (7, 7, 768),
    ]
    assert model(torch.randn(2, 3, 224, 224)).shape == (2, 1000)


def test_patch_embedding_is_partition_then_linear():
    # 224x224x3 -> 4x4 patches flattened to 56x56x48 -> linear map to 56x56x96.
    model = create_model("swin_t", patch_norm=False)
    x = torch.randn(2, 3, 224, 224)
    patches = F.unfold(x, kernel_size=4, stride=4).transpose(1, 2)  # (2, 3136, 48)
    assert patches.shape == (2, 56 * 56, 48)
    proj = model.patch_embed.proj
    linear = patches @ proj.weight.reshape(96, 48).T + proj.bias
    expected = linear.reshape(2, 56, 56, 96)
    torch.testing.assert_close(model.patch_embed(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_conv_stem_reaches_the_patch_grid_with_local_overlapping_filters(patch_size):
    model = create_model(
        "swin_cifar", num_classes=10, stem="conv", patch_size=patch_size, img_size=32
    ).eval()
    strides = [m.stride[0] for m in model.patch_embed.stem if isinstance(m, torch.nn.Conv2d)]
    assert strides == [1] + [2] * {1: 0, 2: 1, 4: 2}[patch_size]
    x = torch.randn(2, 3, 32, 32)
    grid = 32 // patch_size
    with torch.no_grad():
        tokens = model.patch_embed(x)
        assert tokens.shape == (2, grid, grid, model.patch_embed.proj.out_channels)
        # Overlap: changing one pixel changes the tokens of more than its own patch (a
        # non-overlapping linear embedding would change exactly one token).
        y = x.clone()
        y[:, :, patch_size * 2, patch_size * 2] += 5.0
        changed = (model.patch_embed(y) - tokens).abs().amax(dim=(0, 3)) > 1e-6
        assert changed.sum() > 1 and not changed[-1, -1]
        assert model(x).shape == (2, 10)
    # The paper's stem keeps its keys: official, timm and torchvision weights still load.
    assert not any(".stem." in k for k in create_model("swin_cifar").state_dict())


def test_patch_merging_halves_resolution_doubles_channels():
    model = create_model("swin_t")
    merge = model.layers[1].downsample
    x = torch.randn(2, 56, 56, 96)
    assert merge(x).shape == (2, 28, 28, 192)
    assert merge.norm.normalized_shape == (384,)
    assert merge.reduction.weight.shape == (192, 384)
    # Neighbour order is the official one: (0,0), (1,0), (0,1), (1,1) concatenated.
    cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    torch.testing.assert_close(merge(x), merge.reduction(merge.norm(cat)))


def test_swin_t_flops_match_paper():
    # The paper reports multiply-adds as "FLOPs": 4.5 G for Swin-T at 224.
    macs = count_macs(create_model("swin_t"), (3, 224, 224))
    assert abs(macs - 4.5e9) / 4.5e9 < 0.05, macs


def test_window_clamps_to_stage_resolution_and_drops_shift():
    model = create_model("swin_cifar", num_classes=10)  # grid 16 -> 8 -> 4 -> 2, window 4
    windows = [stage.blocks[1].window_size for stage in model.layers]
    shifts = [stage.blocks[1].shift_size for stage in model.layers]
    assert windows == [(4, 4), (4, 4), (4, 4), (2, 2)]
    assert shifts == [(2, 2), (2, 2), (0, 0), (0, 0)]
    assert model.layers[3].blocks[0].attn.relative_position_bias_table.shape == (9, 24)


def test_stochastic_depth_rises_linearly():
    model = create_model("swin_t", drop_path_rate=0.2)
    rates = [
        getattr(block.drop_path, "drop_prob", 0.0)
        for stage in model.layers
        for block in stage.blocks
    ]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert rates == pytest.approx(torch.linspace(0, 0.2, 12).tolist())


def test_shift_off_uses_plain_windows_everywhere():
    model = create_model("swin_t", shift=False)
    blocks = [b for stage in model.layers for b in stage.blocks]
    assert all(b.shift_size == (0, 0) and b.attn_mask is None for b in blocks)


@pytest.mark.parametrize("pos_embed", ["rel", "abs", "abs+rel", "none"])
def test_position_encodings(pos_embed):
    model = create_model("swin_cifar", num_classes=10, pos_embed=pos_embed)
    names = {n for n, _ in model.named_parameters()}
    has_rel = any("relative_position_bias_table" in n for n in names)
    assert has_rel == ("rel" in pos_embed)
    assert ("absolute_pos_embed" in names) == ("abs" in pos_embed)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = create_model("swin_cifar", num_classes=10, drop_path_rate=0.0)
    ckpt = create_model("swin_cifar", num_classes=10, drop_path_rate=0.0, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    plain(x).sum().backward()
    ckpt(x).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_other_input_size_pads_windows():
    model = create_model("swin_cifar", num_classes=10).eval()
    # 40x40 -> grid 20, not a multiple of the window (4 fits, 20 = 5 windows) then 10 -> pad to 12.
    out = model(torch.randn(1, 3, 40, 40))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"img_size": 225}, "not divisible by patch_size=4"),
        ({"depths": (2, 2, 6), "num_heads": (3, 6, 12, 24)}, "equal length"),
        ({"embed_dim": 100}, "not divisible by num_heads[0]=3"),
        (
            {"pos_embed": "sinusoidal"},
            "'sinusoidal' is not one of rel, cpb, abs, abs+rel, abs+cpb, none",
        ),
        ({"drop_path_rate": 1.0}, "drop_path_rate=1.0 must be in [0, 1)"),
        ({"attn_drop_rate": -0.1}, "attn_drop_rate=-0.1 must be in [0, 1)"),
        ({"window_size": 0}, "window_size=0 must be >= 1"),
        ({"stem": "resnet"}, "stem='resnet' is not one of patch, conv"),
        ({"stem": "conv", "patch_size": 3, "img_size": 33}, "patch_size must be a power of 2"),
    ],
)
def test_bad_settings_are_rejected_by_name(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SwinTransformer(**kwargs)


def test_input_not_divisible_by_patch_is_rejected():
    model = create_model("swin_cifar", num_classes=10)
    with pytest.raises(ValueError, match="not divisible by patch_size=2"):
        model(torch.randn(1, 3, 33, 33))


@pytest.mark.parametrize("path", sorted((CONFIGS / "models").glob("*.yaml")), ids=lambda p: p.stem)
def test_model_configs_are_their_presets(path):
    # configs/models/<name>.yaml and PRESETS[<name>] write the same shapes twice: every key the
    # config sets equals the preset's (img_size comes from the data), and each config sets
    # every architecture key of its preset.
    import yaml

    from swin_lightning.models.presets import PRESETS

    net = yaml.safe_load(path.read_text())["model"]["net"]
    preset = {k: v for k, v in PRESETS[path.stem].items() if k not in ("img_size", "num_classes")}
    as_listed = {k: list(v) if isinstance(v, tuple) else v for k, v in preset.items()}
    default_patch = {"patch_size": 4}  # the constructor's default, which presets leave out
    assert {**default_patch, **as_listed} == net
