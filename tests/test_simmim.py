"""SimMIM pretraining: masks, the masked-only loss, learning, and loading into a classifier."""

from __future__ import annotations

import math

import pytest
import torch

from swin_lightning.models import SwinTransformer, create_model, load_pretrained
from swin_lightning.simmim import SimMIM, random_block_mask, reconstruction_loss
from tests.conftest import CONFIGS, load_elsewhere, run_cli
from tests.test_equivalence import to_official_layout

DEMO_NET = dict(patch_size=2, embed_dim=48, depths=[2, 2], num_heads=[3, 6], window_size=4)
PRETRAIN_DEMO = str(CONFIGS / "simmim" / "pretrain_demo.yaml")


def demo_simmim(**kwargs) -> SimMIM:
    torch.manual_seed(0)
    net = SwinTransformer(img_size=32, num_classes=0, drop_path_rate=0.0, **DEMO_NET)
    return SimMIM(net, **{"mask_patch_size": 8, **kwargs})


@pytest.mark.parametrize(
    ("image_size", "mask_patch", "patch", "ratio"),
    [
        ((32, 32), 8, 2, 0.6),
        ((64, 64), 16, 4, 0.6),
        ((192, 192), 32, 4, 0.6),
        ((224, 224), 32, 4, 0.6),  # 49 blocks: ceil(29.4) = 30 of them
        ((96, 160), 32, 4, 0.75),
        ((32, 32), 2, 2, 0.5),
    ],
)
def test_mask_hides_the_configured_share_of_whole_blocks(image_size, mask_patch, patch, ratio):
    generator = torch.Generator().manual_seed(0)
    mask = random_block_mask(16, image_size, mask_patch, patch, ratio, generator)
    assert mask.shape == (16, image_size[0] // patch, image_size[1] // patch)
    scale = mask_patch // patch
    blocks = mask.view(16, image_size[0] // mask_patch, scale, image_size[1] // mask_patch, scale)
    # Every block is masked as a whole ...
    assert (blocks.all(dim=(2, 4)) == blocks.any(dim=(2, 4))).all()
    # ... and each image hides exactly ceil(ratio * blocks) of them.
    n_blocks = blocks.shape[1] * blocks.shape[3]
    per_image = blocks.any(dim=(2, 4)).sum(dim=(1, 2))
    assert per_image.tolist() == [math.ceil(ratio * n_blocks)] * 16
    hidden_patches = math.ceil(ratio * n_blocks) * scale**2
    assert mask.sum(dim=(1, 2)).tolist() == [hidden_patches] * 16
    # Images differ from one another, and differ between seeds.
    assert not (mask == mask[:1]).all()
    again = random_block_mask(16, image_size, mask_patch, patch, ratio, torch.Generator())
    assert not torch.equal(mask, again)


def test_masks_are_a_function_of_the_seed_and_step():
    model = demo_simmim()
    assert torch.equal(model.make_mask(4, seed=3), demo_simmim().make_mask(4, seed=3))
    assert not torch.equal(model.make_mask(4, seed=3), model.make_mask(4, seed=4))
    assert not torch.equal(
        model.make_mask(4, seed=3), demo_simmim(mask_seed=1).make_mask(4, seed=3)
    )


def test_loss_sees_the_masked_pixels_only():
    model = demo_simmim()
    images = torch.randn(2, 3, 32, 32)
    mask = model.make_mask(2, seed=0)
    pixel_mask = model.pixel_mask(mask)
    with torch.no_grad():
        loss, reconstruction = model.loss(images, mask)
    torch.testing.assert_close(loss, reconstruction_loss(reconstruction, images, pixel_mask))
    hidden = pixel_mask[0, 0].nonzero()[0].tolist()
    shown = (~pixel_mask[0, 0]).nonzero()[0].tolist()
    for (row, col), changes in ((hidden, True), (shown, False)):
        target = images.clone()
        target[0, 1, row, col] += 10.0
        changed = reconstruction_loss(reconstruction, target, pixel_mask)
        assert (changed != loss).item() is changes
    # The encoder sees nothing of the hidden pixels: changing them leaves the reconstruction.
    altered = images.clone()
    altered[pixel_mask.expand_as(images)] = 7.0
    with torch.no_grad():
        torch.testing.assert_close(model(altered, mask), reconstruction)


def test_reconstruction_loss_falls_when_overfitting_a_few_batches():
    from swin_lightning.data import EmbeddedShapesDataModule

    data = EmbeddedShapesDataModule(train_size=32, val_size=16, batch_size=16, num_workers=0)
    data.setup("fit")
    batches = [images for images, _ in data.train_dataloader()][:2]
    model = demo_simmim()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    masks = [model.make_mask(16, seed=i) for i in range(len(batches))]
    losses = []
    for step in range(60):
        loss, _ = model.loss(batches[step % 2], masks[step % 2])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_bad_settings_are_one_clear_error():
    with pytest.raises(ValueError, match=r"mask_ratio=1\.0 must be in"):
        demo_simmim(mask_ratio=1.0)
    with pytest.raises(ValueError, match="mask_patch_size=3 must be a positive multiple"):
        demo_simmim(mask_patch_size=3)
    with pytest.raises(ValueError, match="mask_patch_size=12 does not tile the 32x32"):
        demo_simmim(mask_patch_size=12)


def _short_pretrain(*extra: str):
    return run_cli(
        "fit", "--config", PRETRAIN_DEMO,
        "--data.init_args.train_size=64", "--data.init_args.val_size=32",
        "--data.init_args.batch_size=16", "--trainer.max_epochs=2",
        "--trainer.log_every_n_steps=1", *extra,
    )  # fmt: skip


def test_pretraining_run_logs_loss_images_and_loads_into_a_classifier(in_tmp, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = _short_pretrain()
    assert isinstance(cli.model, SimMIM) and cli.model.net.num_classes == 0
    run_dir = in_tmp / "logs" / "simmim_demo" / "version_0"
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    assert [s.step for s in events.Scalars("val/loss")] == [3, 7]
    assert len(events.Scalars("train/loss")) == 8
    grids = events.Images("val/input_masked_reconstruction")
    assert [g.step for g in grids] == [0, 1]  # one grid a validation epoch
    checkpoints = sorted((run_dir / "checkpoints").glob("epoch*-loss_*.ckpt"))
    assert checkpoints, "the best-loss checkpoint is kept"

    # The checkpoint alone rebuilds the module in a new process: the same encoder features.
    x = torch.randn(2, 3, 32, 32)
    got = load_elsewhere("simmim", "SimMIM", run_dir / "checkpoints" / "last.ckpt", x, in_tmp)
    with torch.no_grad():
        want = cli.model.net.eval()(x)
    assert torch.equal(got["module"], want) and torch.equal(got["load_model"], want)

    # The encoder loads into the classifier: no missing key but the fresh head.
    classifier = SwinTransformer(img_size=32, num_classes=7, **DEMO_NET)
    report = load_pretrained(classifier, run_dir / "checkpoints" / "last.ckpt", adapt=True)
    assert report.missing == [] and report.unexpected == []
    assert report.reinitialized == ["head.bias", "head.weight"]
    encoder = cli.model.net.state_dict()
    for key, value in classifier.state_dict().items():
        if not key.startswith("head."):
            torch.testing.assert_close(value, encoder[key], msg=key)

    # And through the CLI: fine-tune the demo from it.
    tuned = run_cli(
        "fit", "--config", str(CONFIGS / "simmim" / "finetune_demo.yaml"),
        f"--model.pretrained={run_dir / 'checkpoints' / 'last.ckpt'}",
        "--data.init_args.train_size=32", "--data.init_args.val_size=16",
        "--data.init_args.batch_size=16", "--trainer.fast_dev_run=true",
    )  # fmt: skip
    assert tuned.model.pretrained_report.reinitialized == ["head.bias", "head.weight"]

    # Given as --ckpt_path to a classifier: what it is, and the way that works.
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli("validate", "--config", str(CONFIGS / "demo.yaml"),
                f"--ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")  # fmt: skip
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a SimMIM pretraining checkpoint" in err, err
    assert "--model.pretrained" in err and "mask_patch_size" not in err


def test_official_simmim_checkpoint_loads_with_window_transfer():
    # The official code saves {'model': {'encoder.<official Swin keys>', 'encoder.mask_token',
    # 'decoder.0.weight', 'decoder.0.bias'}}; here with random weights, 192 px / window 6.
    torch.manual_seed(0)
    pretrained = create_model("swin_t", img_size=192, window_size=6, num_classes=0)
    official = to_official_layout(pretrained.state_dict())["model"]
    state = {f"encoder.{k}": v for k, v in official.items()}
    state["encoder.mask_token"] = torch.zeros(1, 1, 96)
    state["decoder.0.weight"] = torch.zeros(32 * 32 * 3, 768, 1, 1)
    state["decoder.0.bias"] = torch.zeros(32 * 32 * 3)
    model = create_model("swin_t", num_classes=10)  # 224 px, window 7
    report = load_pretrained(model, {"model": state}, adapt=True)
    assert report.layout == "official"
    assert report.missing == [] and report.unexpected == []
    assert report.reinitialized == ["head.bias", "head.weight"]
    assert report.resized["layers.0.blocks.0.attn.relative_position_bias_table"] == (
        (121, 3),
        (169, 3),
    )
    torch.testing.assert_close(
        model.layers[2].blocks[3].mlp.fc1.weight, pretrained.layers[2].blocks[3].mlp.fc1.weight
    )


def test_imagefolder_pretraining_encoder_loads_into_the_recipe():
    """configs/simmim/pretrain_imagefolder.yaml repeats the encoder of configs/imagefolder.yaml:
    its weights must load into the recipe's classifier with nothing resized or missing."""
    import yaml

    def net(path, *keys):
        section = yaml.safe_load(path.read_text())["model"]
        for key in keys:
            section = section[key]
        return section

    encoder = SwinTransformer(
        img_size=32, num_classes=0, **net(CONFIGS / "simmim" / "pretrain_imagefolder.yaml",
                                          "init_args", "net"),
    )  # fmt: skip
    classifier = SwinTransformer(img_size=32, num_classes=10, **net(CONFIGS / "imagefolder.yaml",
                                                                    "net"))  # fmt: skip
    report = load_pretrained(classifier, encoder.state_dict(), adapt=True)
    assert report.missing == [] and report.unexpected == [] and report.resized == {}
    assert report.reinitialized == ["head.bias", "head.weight"]
    for key, value in encoder.state_dict().items():
        assert torch.equal(classifier.state_dict()[key], value), key


def test_ablate_plans_every_variant_of_a_simmim_config(tmp_path):
    # The campaign commands resolve a run's settings with the model the configs ask for
    # (before: always the classifier, which rejected every SimMIM variant).
    from swin_lightning.ablate import plan
    from swin_lightning.runs.spec import AblationSpec

    path = tmp_path / "spec.yaml"
    path.write_text("experiment: mim\nseeds: [0, 1]\nvariants:\n"
                    "  r40: [model.init_args.mask_ratio=0.4]\n"
                    "  r60: [model.init_args.mask_ratio=0.6]\n")  # fmt: skip
    runs = plan(["--config", PRETRAIN_DEMO], AblationSpec.load(path), tmp_path / "mim", [], [])
    assert sorted((r.variant, r.seed) for r in runs) == [
        ("r40", 0), ("r40", 1), ("r60", 0), ("r60", 1)]  # fmt: skip
    assert len({r.fingerprint for r in runs}) == 2


@pytest.mark.slow
def test_a_tune_trial_of_simmim_reports_its_val_loss(in_tmp):
    # SimMIM logs val/loss and no val/acc1: the trial is told its loss (before: marked failed).
    import optuna
    import yaml

    from swin_lightning.tune import main as tune_main

    spec = in_tmp / "search.yaml"
    spec.write_text(yaml.safe_dump({
        "study": "mim", "metric": "val/loss", "direction": "minimize", "n_trials": 1,
        "sampler": "random", "pruner": "none", "seed": 0,
        "space": {"model.init_args.mask_ratio": {"type": "float", "low": 0.4, "high": 0.7}},
    }))  # fmt: skip
    tiny = ["data.init_args.train_size=32", "data.init_args.val_size=16",
            "data.init_args.batch_size=16", "trainer.max_epochs=1"]  # fmt: skip
    assert tune_main(["--config", PRETRAIN_DEMO, str(spec), "--log_dir", str(in_tmp), *tiny]) == 0
    study = optuna.load_study(study_name="mim", storage=f"sqlite:///{in_tmp / 'mim' / 'study.db'}")
    (trial,) = study.get_trials(deepcopy=False)
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert 0 < trial.value < 10 and 0.4 <= trial.params["model.init_args.mask_ratio"] <= 0.7
