"""Swin V2's changes as switches of the same blocks: each combination, its parts, its errors."""

import itertools
import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F

from swin_lightning.models import SwinTransformer, count_macs, create_model, load_pretrained
from swin_lightning.models.swin import LOGIT_SCALE_MAX, SwinBlock, WindowAttention
from swin_lightning.models.windows import log_spaced_relative_coords

# timm's parameter counts (swinv2_*); a window size does not change them (the position
# bias is an MLP over offsets, not a table), so one window per shape is enough.
TIMM_V2_PARAMS = {
    "swinv2_t": 28_347_154,  # swinv2_tiny_window8_256 (and _window16_256)
    "swinv2_s": 49_728_418,  # swinv2_small_window8_256
    "swinv2_b": 87_918_816,  # swinv2_base_window8_256, _window12to16_192to256, ...
    "swinv2_b_w12": 109_280_841,  # swinv2_base_window12_192 (ImageNet-22K head)
    "swinv2_l_w12to24": 196_739_932,  # swinv2_large_window12to24_192to384
}

SWITCHES = {
    "block_norm": ("pre", "post"),
    "attention": ("dot", "cosine"),
    "pos_embed": ("rel", "cpb"),
    "merge_norm": ("pre", "post"),
}
COMBINATIONS = [dict(zip(SWITCHES, c, strict=True)) for c in itertools.product(*SWITCHES.values())]
# Small enough to train on a CPU in a moment, with a shifted block and a patch merging.
TINY = {"img_size": 32, "patch_size": 2, "embed_dim": 16, "depths": (2, 2), "num_heads": (2, 4),
        "window_size": 4, "num_classes": 5, "drop_path_rate": 0.1}  # fmt: skip


@pytest.mark.parametrize("name", list(TIMM_V2_PARAMS))
def test_parameter_count_equals_timm(name):
    assert sum(p.numel() for p in create_model(name).parameters()) == TIMM_V2_PARAMS[name]


def test_swinv2_flops_match_paper():
    # The V2 paper's multiply-adds at 256 px: 5.9 G (window 8) and 6.6 G (window 16).
    assert abs(count_macs(create_model("swinv2_t"), (3, 256, 256)) - 5.9e9) < 0.1e9
    assert abs(count_macs(create_model("swinv2_t_w16"), (3, 256, 256)) - 6.6e9) < 0.1e9


def _switch_id(switches):
    return ",".join(f"{k}={v}" for k, v in switches.items())


@pytest.mark.parametrize("switches", COMBINATIONS, ids=_switch_id)
def test_every_switch_combination_trains_and_round_trips(switches, tmp_path):
    torch.manual_seed(0)
    model = SwinTransformer(**TINY, **switches)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    # Two steps: zero-initialised post-norms pass no gradient to their branch on the first.
    for _ in range(2):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not no_grad, f"parameters without a gradient: {no_grad}"
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters()), "no update"
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    torch.manual_seed(1)
    again = SwinTransformer(**TINY, **switches)
    report = load_pretrained(again, path)
    assert not report.missing and not report.unexpected
    model.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_switches_change_what_they_say():
    v1, v2 = SwinTransformer(**TINY), create_model("swinv2_cifar", **TINY)
    v1_keys, v2_keys = set(v1.state_dict()), set(v2.state_dict())
    block = "layers.0.blocks.0.attn."
    assert {block + k for k in ("q_bias", "v_bias", "logit_scale", "cpb_mlp.0.weight")} <= v2_keys
    assert block + "qkv.bias" not in v2_keys  # cosine attention: no key bias
    assert block + "relative_position_bias_table" in v1_keys - v2_keys
    assert v1.layers[1].downsample.norm.normalized_shape == (64,)  # 4C, before the reduction
    assert v2.layers[1].downsample.norm.normalized_shape == (32,)  # 2C, after it
    assert v2.layers[0].blocks[0].post_norm and not v1.layers[0].blocks[0].post_norm


def test_post_norm_normalises_the_branch_output():
    torch.manual_seed(0)
    block = SwinBlock(8, 2, (4, 4), 4, shift=False, norm="post").eval()
    with torch.no_grad():  # off zero (V2 starts them at zero, where every placement gives x)
        for norm in (block.norm1, block.norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    x = torch.randn(1, 4, 4, 8) * 10

    def layer_norm(t, norm):  # by hand: zero mean and unit variance over channels, affine
        centred = t - t.mean(-1, keepdim=True)
        scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps)
        return centred * scale * norm.weight + norm.bias

    with torch.no_grad():
        # One 4x4 window, no shift: the attention branch is the window attention of all tokens.
        attention = block.attn(x.reshape(1, 1, 16, 8)).reshape(1, 4, 4, 8)
        after_attn = x + layer_norm(attention, block.norm1)
        expected = after_attn + layer_norm(block.mlp(after_attn), block.norm2)
        got = block(x)
        # V1's pre-norm placement of the same weights gives something else.
        pre = x + block.attn(layer_norm(x, block.norm1).reshape(1, 1, 16, 8)).reshape(1, 4, 4, 8)
        pre = pre + block.mlp(layer_norm(pre, block.norm2))
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, pre, atol=1e-3) and not torch.allclose(got, x, atol=1e-3)


def test_post_norm_blocks_start_as_the_identity():
    # The official V2 code's initialisation: both post-norms start at zero.
    block = SwinBlock(8, 2, (8, 8), 4, shift=True, norm="post")
    x = torch.randn(2, 8, 8, 8)
    assert torch.equal(block(x), x)
    F.mse_loss(block(x), torch.randn_like(x)).backward()
    assert block.norm1.weight.grad.abs().sum() > 0  # and it learns from there


def test_cosine_logits_are_clamped_at_100():
    torch.manual_seed(0)
    attn = WindowAttention(8, 2, (4, 4), attention="cosine", position_bias="none").eval()
    x = torch.randn(1, 1, 16, 8)
    with torch.no_grad():
        attn.logit_scale.fill_(LOGIT_SCALE_MAX)
        at_limit = attn.attention_probs(x)
        attn.logit_scale.fill_(20.0)  # exp(20): far past the clamp
        assert torch.equal(attn.attention_probs(x), at_limit)
        # The logits are the cosines of raw query and key projections, times 100.
        q, k, _ = attn.qkv(x).view(1, 1, 16, 3, 2, 4).unbind(3)  # (1, 1, N, heads, d)
        cos = F.cosine_similarity(q[0, 0, :, None], k[0, 0, None, :], dim=-1)  # (N, N, heads)
        expected = (100 * cos.permute(2, 0, 1)).softmax(-1)
        torch.testing.assert_close(at_limit[0, 0], expected)
    assert math.isclose(LOGIT_SCALE_MAX, math.log(100))


def test_cpb_bias_is_bounded_and_window_independent():
    torch.manual_seed(0)
    attn8 = WindowAttention(8, 2, (8, 8), position_bias="cpb", attention="cosine")
    attn16 = WindowAttention(8, 2, (16, 16), position_bias="cpb", attention="cosine",
                             pretrained_window_size=(8, 8))  # fmt: skip
    attn16.load_state_dict(attn8.state_dict())
    with torch.no_grad():
        b8, b16 = attn8.relative_position_bias(), attn16.relative_position_bias()
    assert b8.shape == (2, 64, 64) and b16.shape == (2, 256, 256)
    assert b16.min() > 0 and b16.max() < 16  # 16 * sigmoid
    # Offsets the two windows share get the same bias: offset (0, 1) and (3, -2).
    index8, index16 = attn8.relative_position_index, attn16.relative_position_index
    for dy, dx in ((0, 1), (3, -2)):
        i8 = (dy + 7) * 15 + dx + 7
        i16 = (dy + 15) * 31 + dx + 15
        q8, k8 = (index8 == i8).nonzero()[0]
        q16, k16 = (index16 == i16).nonzero()[0]
        torch.testing.assert_close(b8[:, q8, k8], b16[:, q16, k16])


def test_log_spaced_coords_against_timm():
    theirs = timm.create_model("swinv2_tiny_window16_256", pretrained_window_sizes=(8, 8, 8, 8))
    table = theirs.layers[0].blocks[0].attn.relative_coords_table[0]
    torch.testing.assert_close(log_spaced_relative_coords((16, 16), (8, 8)), table)
    coords = log_spaced_relative_coords((8, 8))
    # The largest offset, 7, is scaled to 8, then log-spaced: log2(1 + 8) / log2(8).
    assert coords.shape == (15, 15, 2)
    assert math.isclose(coords.abs().max().item(), math.log2(9) / 3, rel_tol=1e-6)
    assert torch.isfinite(log_spaced_relative_coords((1, 1))).all()  # a window of 1: no 0/0


def test_cosine_attention_trains_finite_in_bf16_autocast():
    torch.manual_seed(0)
    model = create_model("swinv2_cifar", **TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()


def test_v2_parameters_take_no_weight_decay():
    from swin_lightning.optimization import weight_decay_groups

    model = create_model("swinv2_cifar", **TINY)
    decayed, _ = weight_decay_groups(model, model.no_weight_decay_keywords())
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = [names[id(p)] for p in decayed["params"]]
    assert decayed_names and not [n for n in decayed_names if "cpb_mlp" in n or "logit" in n]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attention": "flash"}, "attention='flash' is not one of dot, cosine"),
        ({"block_norm": "sandwich"}, "block_norm='sandwich' is not one of pre, post"),
        ({"merge_norm": "none"}, "merge_norm='none' is not one of pre, post"),
        ({"pretrained_window_size": 12}, "only applies to the continuous position bias"),
        ({"pos_embed": "cpb", "pretrained_window_size": [12, 6]}, "one per stage (4 stages)"),
        ({"pos_embed": "cpb", "pretrained_window_size": -1}, "must be one int >= 0"),
    ],
)
def test_bad_v2_settings_are_rejected_by_name(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SwinTransformer(**kwargs)


def test_v2_ablation_spec_builds_the_models_it_names(monkeypatch):
    # Each variant of configs/ablations/specs/v2.yaml, through the CLI, on its base config.
    from swin_lightning.runs.spec import AblationSpec, cli_args
    from tests.conftest import CONFIGS, REPO, run_cli

    monkeypatch.chdir(REPO)
    spec = AblationSpec.load(CONFIGS / "ablations" / "specs" / "v2.yaml")
    nets = {}
    for name, items in spec.variants.items():
        args = ["--config", "configs/ablations/window_pairs.yaml", *cli_args(items)]
        nets[name] = run_cli(*args, run=False).model.net
    assert nets["v1"].pos_embed == "rel" and not nets["v1"].layers[0].blocks[0].post_norm
    assert nets["post_norm"].layers[0].blocks[0].post_norm
    assert nets["cosine"].layers[0].blocks[0].attn.logit_scale is not None
    assert nets["cpb"].layers[0].blocks[0].attn.cpb_mlp is not None
    assert not nets["merge_post_norm"].layers[1].downsample.norm_first
    v2 = nets["v2"]
    assert v2.layers[0].blocks[0].post_norm and not v2.layers[1].downsample.norm_first
    assert v2.layers[0].blocks[0].attn.cpb_mlp is not None
    assert v2.layers[0].blocks[0].attn.logit_scale is not None
