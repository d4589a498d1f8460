"""Fine-tuning from pretrained weights: resized position tables, a new head, layer-wise LR decay."""

from __future__ import annotations

import functools
import itertools
import logging
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from timm.models.swin_transformer import SwinTransformer as TimmSwin

from swin_lightning.classifier import SwinClassifier
from swin_lightning.models import SwinTransformer, load_pretrained
from swin_lightning.schedules import WarmupCosineLR
from tests.conftest import CONFIGS, QUIET, run_cli, write_imagefolder

TABLE = "relative_position_bias_table"


def bicubic_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """The expected resize, written out: (L, heads) -> (heads, s, s) image -> bicubic -> back."""
    side, heads = math.isqrt(table.shape[0]), table.shape[1]
    image = table.T.reshape(1, heads, side, side)
    out = F.interpolate(image, size=(2 * window - 1,) * 2, mode="bicubic", align_corners=False)
    return out.reshape(heads, -1).T


def test_timm_weights_fine_tune_through_cli(tmp_path, in_tmp, caplog, capsys):
    """timm Swin (window 7, 1000 classes) -> this model (window 8, 3 classes), one step.

    The recipe's conv stem cannot take released weights: the error says which key to set."""
    torch.manual_seed(0)
    source = TimmSwin(
        img_size=56, patch_size=4, window_size=7, embed_dim=24, depths=(2, 2),
        num_heads=(2, 4), num_classes=1000,
    )  # fmt: skip
    weights = tmp_path / "swin_small_timm.pth"
    torch.save(source.state_dict(), weights)
    source_state = {k.replace("head.fc.", "head."): v for k, v in source.state_dict().items()}
    images = write_imagefolder(tmp_path / "images", size=64)
    args = [
        "--config", str(CONFIGS / "imagefolder.yaml"),
        f"--data.init_args.root={images}", "--data.init_args.image_size=64",
        "--data.init_args.batch_size=4", "--data.init_args.num_workers=0",
        "--model.net.patch_size=4", "--model.net.embed_dim=24", "--model.net.depths=[2, 2]",
        "--model.net.num_heads=[2, 4]", "--model.net.window_size=8",
        f"--model.pretrained={weights}", "--model.layer_decay=0.75",
        "--model.lr_scale_batch_size=8",
        "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu", *QUIET,
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args, run=False)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "patch_embed.proj.weight" in err and "set model.net.stem: patch" in err
    with caplog.at_level(logging.WARNING, logger="swin_lightning.models.pretrained"):
        cli = run_cli(*args, "--model.net.stem=patch", run=False)
    net = cli.model.net
    report = cli.model.pretrained_report

    tables = [k for k in net.state_dict() if k.endswith(TABLE)]
    assert len(tables) == 4
    assert report.layout == "timm"
    assert set(report.resized) == set(tables)
    assert report.resized[tables[0]] == ((13 * 13, 2), (15 * 15, 2))
    assert report.reinitialized == ["head.bias", "head.weight"]
    assert report.missing == [] and report.unexpected == []
    assert "resized (bicubic)" in caplog.text and "head left at its fresh init" in caplog.text

    for key, value in net.state_dict().items():
        if key.endswith(TABLE):
            torch.testing.assert_close(value, bicubic_table(source_state[key], 8))
        elif key.startswith("head."):
            assert value.shape[0] == 3 and source_state[key].shape[0] == 1000
        else:
            assert torch.equal(value, source_state[key]), key

    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    # Layer decay and linear scaling (batch 4 / 8) are in the rate each schedule multiplies.
    recipe = yaml.safe_load((CONFIGS / "imagefolder.yaml").read_text())
    base_lr = recipe["model"]["optimizer"]["init_args"]["lr"]
    groups = cli.trainer.optimizers[0].param_groups
    assert len({g["lr_scale"] for g in groups}) == 6  # stem, 4 blocks, head
    for group in groups:
        assert group["initial_lr"] == pytest.approx(base_lr * 0.5 * group["lr_scale"])


def _small_net(img_size: int, **kwargs) -> SwinTransformer:
    """One stage of 2 blocks, 4x4 patches, window 4, absolute and relative positions."""
    defaults = {"patch_size": 4, "embed_dim": 16, "depths": (2,), "num_heads": (2,)}
    defaults |= {"window_size": 4, "pos_embed": "abs+rel", "num_classes": 5}
    return SwinTransformer(img_size=img_size, **{**defaults, **kwargs})


def test_absolute_pos_embed_is_resized():
    torch.manual_seed(0)
    source = _small_net(32)  # 8x8 patch grid
    target = _small_net(48)  # 12x12 patch grid, same windows
    with pytest.raises(ValueError, match=r"absolute_pos_embed: checkpoint \(1, 8, 8, 16\)"):
        load_pretrained(target, source.state_dict())  # adapt=False: still a mismatch
    report = load_pretrained(target, source.state_dict(), adapt=True)
    assert report.resized == {"absolute_pos_embed": ((1, 8, 8, 16), (1, 12, 12, 16))}
    assert report.reinitialized == []
    expected = F.interpolate(
        source.absolute_pos_embed.permute(0, 3, 1, 2), size=(12, 12), mode="bicubic"
    ).permute(0, 2, 3, 1)
    torch.testing.assert_close(target.absolute_pos_embed, expected)
    # The source model interpolates its embedding on the fly for 48x48 inputs: same logits.
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(target.eval()(x), source.eval()(x))


def test_official_layout_pos_embed_of_another_grid():
    """Official files store the embedding flat, (1, L, C); another grid is resized too."""
    torch.manual_seed(0)
    source = _small_net(32, depths=(2, 2), num_heads=(2, 4))
    target = _small_net(64, depths=(2, 2), num_heads=(2, 4))
    official = {
        k.replace("layers.1.downsample", "layers.0.downsample"): v
        for k, v in source.state_dict().items()
    }
    official["absolute_pos_embed"] = source.absolute_pos_embed.detach().reshape(1, 64, 16)
    report = load_pretrained(target, official, adapt=True)
    assert report.layout == "official"
    assert report.resized == {"absolute_pos_embed": ((1, 8, 8, 16), (1, 16, 16, 16))}


def test_other_mismatches_still_raise_with_adapt():
    source = _small_net(32, embed_dim=16)
    target = _small_net(32, embed_dim=32)
    with pytest.raises(ValueError, match=r"patch_embed\.proj\.weight: checkpoint \(16, 3, 4, 4\)"):
        load_pretrained(target, source.state_dict(), adapt=True)


def test_head_of_another_class_count_is_not_missing():
    source = _small_net(32)
    target = _small_net(32, num_classes=7)
    fresh_head = target.head.weight.detach().clone()
    report = load_pretrained(target, source.state_dict(), strict=True, adapt=True)
    assert report.reinitialized == ["head.bias", "head.weight"] and report.missing == []
    assert torch.equal(target.head.weight, fresh_head)
    assert torch.equal(target.norm.weight, source.norm.weight)


def _layer_decay_module(layer_decay: float | None) -> SwinClassifier:
    net = _small_net(32, depths=(2, 2), num_heads=(2, 4))
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)
    return SwinClassifier(net, optimizer=optimizer, layer_decay=layer_decay)


def test_layer_decay_groups_are_geometric_from_head_to_patch_embed():
    module = _layer_decay_module(0.5)
    optimizer = module.configure_optimizers()
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    names = dict(module.net.named_parameters())
    assert len(group_of) == len(names)  # every parameter in exactly one group
    lr = {name: group_of[id(p)]["lr"] for name, p in names.items()}
    # stem 0, blocks 1-4 (merging joins the block after it, the final norm the last), head 5
    layer = {
        "patch_embed.proj.weight": 0, "absolute_pos_embed": 0,
        "layers.0.blocks.0.attn.qkv.weight": 1, "layers.0.blocks.1.mlp.fc1.weight": 2,
        "layers.1.downsample.reduction.weight": 3, "layers.1.blocks.0.attn.proj.weight": 3,
        "layers.1.blocks.1.attn.relative_position_bias_table": 4, "norm.weight": 4,
        "head.weight": 5, "head.bias": 5,
    }  # fmt: skip
    for name, i in layer.items():
        assert lr[name] == pytest.approx(1e-3 * 0.5 ** (5 - i)), name
    rates = sorted({round(v, 12) for v in lr.values()}, reverse=True)
    assert len(rates) == 6
    assert all(b / a == pytest.approx(0.5) for a, b in itertools.pairwise(rates))

    # Weight decay exactly as without layer decay: none for ndim <= 1 and the position tables.
    keywords = module.net.no_weight_decay_keywords()
    for name, param in names.items():
        no_decay = param.ndim <= 1 or any(k in name for k in keywords)
        assert group_of[id(param)]["weight_decay"] == (0.0 if no_decay else 0.05), name

    # The schedule multiplies each group's own initial rate: the ratios survive every step.
    scheduler = WarmupCosineLR(optimizer, warmup_epochs=1, total_steps=10, steps_per_epoch=2)
    for _ in range(9):
        optimizer.step()
        scheduler.step()
        per_scale = {g["lr"] / g["lr_scale"] for g in optimizer.param_groups}
        assert max(per_scale) == pytest.approx(min(per_scale), rel=1e-9)


def test_layer_decay_off_and_one():
    plain = _layer_decay_module(None).configure_optimizers()
    assert len(plain.param_groups) == 2 and {g["lr"] for g in plain.param_groups} == {1e-3}
    flat = _layer_decay_module(1.0).configure_optimizers()
    assert {g["lr"] for g in flat.param_groups} == {1e-3}


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_layer_decay_is_validated(value):
    with pytest.raises(ValueError, match=rf"model\.layer_decay={value} must be in \(0, 1\]"):
        _layer_decay_module(value)
