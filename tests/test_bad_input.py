"""Bad input through the CLI: one readable ``error:`` line naming the setting, before training.

The constructors' own checks have unit tests (test_model_shapes.py, test_data.py); these go
through ``python -m swin_lightning`` in-process and read what the user sees on stderr.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from swin_lightning.models import SwinTransformer
from tests.conftest import CONFIGS, TINY_DEMO, run_cli, write_imagefolder

# If a bad setting slipped through, this would train one step and write a checkpoint.
ONE_STEP = ["--trainer.max_steps=1", "--trainer.limit_val_batches=1"]
DEMO = [*TINY_DEMO, *ONE_STEP]


def images_args(root: Path, *extra: str) -> list[str]:
    """A tiny run of configs/imagefolder.yaml on ``root``, in the main process."""
    return [
        "--config", str(CONFIGS / "imagefolder.yaml"), f"--data.init_args.root={root}",
        "--data.init_args.num_workers=0", "--data.init_args.batch_size=4",
        "--model.net.embed_dim=16", "--model.net.num_heads=[1,2,4]", *ONE_STEP, *extra,
    ]  # fmt: skip


def fails(capsys, *args: str) -> str:
    """Run the CLI, expect exit code 2 without a traceback; the stderr text."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: " in err, err
    return err


def nothing_trained(folder: Path) -> bool:
    """No checkpoint and no metric logged (only what is logged as fit starts: hparams, size)."""
    if list(folder.rglob("*.ckpt")):
        return False
    for events in folder.rglob("events.out.tfevents.*"):
        tags = EventAccumulator(str(events.parent)).Reload().Tags()["scalars"]
        if any(not tag.startswith("model/") and tag != "hp_metric" for tag in tags):
            return False
    return True


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # 1. image size vs patch size (the data's image_size is linked into the model)
        (["--model.net.patch_size=5"], ["img_size=(32, 32) is not divisible by patch_size=5",
                                        "valid sizes are multiples of 5"]),
        (["--data.init_args.image_size=33"], ["img_size=(33, 33)", "patch_size=2"]),
        # 2. a stage resolution the window cannot tile, padding off: 40/2 = 20, then 10
        (["--data.init_args.image_size=40", "--model.net.pad_windows=false"],
         ["stage 1 resolution (10, 10) is not tiled by window_size=4", "pad_windows: true"]),
        # 3. one entry per stage
        (["--model.net.depths=[2,2,2]"], ["depths=[2, 2, 2] and num_heads=[3, 6]",
                                          "equal length"]),
        # 4. channels per stage vs heads
        (["--model.net.embed_dim=50"], ["stage 0 has 50 channels (embed_dim=50 x 2^0)",
                                        "not divisible by num_heads[0]=3"]),
        (["--model.net.num_heads=[3,5]"], ["stage 1 has 96 channels", "num_heads[1]=5"]),
        # 5. unknown position encoding: rejected by the parser, with the valid values
        (["--model.net.pos_embed=sinusoidal"], ["pos_embed", "'rel', 'cpb', 'abs', 'abs+rel', 'abs+cpb', 'none'",
                                                "sinusoidal"]),
        # 6. rates outside [0, 1)
        (["--model.net.drop_rate=1.5"], ["drop_rate=1.5 must be in [0, 1)"]),
        (["--model.net.attn_drop_rate=-0.1"], ["attn_drop_rate=-0.1 must be in [0, 1)"]),
        (["--model.net.drop_path_rate=1.0"], ["drop_path_rate=1.0 must be in [0, 1)"]),
        # 7. non-positive learning rate and batch size
        (["--model.optimizer.init_args.lr=0"], ["model.optimizer.init_args.lr=0.0 must be > 0"]),
        (["--model.optimizer.init_args.lr=-0.001"], ["model.optimizer.init_args.lr=-0.001"]),
        (["--data.init_args.batch_size=0"], ["data.batch_size=0 must be > 0"]),
    ],
)  # fmt: skip
def test_bad_setting_is_one_line_before_training(args, expected, in_tmp, capsys):
    err = fails(capsys, "fit", *DEMO, *args)
    for text in expected:
        assert text in err, err
    assert "Does not validate against any of the Union subtypes" not in err  # unwrapped
    assert nothing_trained(in_tmp)


def test_fitting_settings_still_train(in_tmp):
    # The counterpart of the cases above: the same run, valid, trains and checkpoints.
    cli = run_cli("fit", *DEMO, "--data.init_args.image_size=32", "--model.net.pad_windows=false")
    assert cli.trainer.global_step == 1 and not nothing_trained(in_tmp)


@pytest.mark.parametrize(
    ("subcommand", "args", "suggestion"),
    [
        ("fit", ["--model.net.window_sise=4"], "Did you mean 'window_size'?"),
        ("validate", ["--model.net.window_sise=4"], "Did you mean 'window_size'?"),
        ("fit", ["--model.labl_smoothing=0.1"], "Did you mean 'model.label_smoothing'?"),
        ("test", ["--trainer.max_epohcs=3"], "Did you mean 'trainer.max_epochs'?"),
        # a prefix of a key is a typo too, never silently that key
        ("fit", ["--trainer.max_epoch=3"], "Did you mean 'trainer.max_epochs'?"),
        ("fit", ["--data.init_args.batch_sise=8"], "Did you mean 'batch_size'?"),
        ("fit", ["--model.optimizer.init_args.lrr=0.1"], "Did you mean 'lr'?"),
        ("predict", ["--checkpoint.monitr=val/loss"], "Did you mean 'checkpoint.monitor'?"),
    ],
)
def test_unknown_key_suggests_the_closest(subcommand, args, suggestion, in_tmp, capsys):
    err = fails(capsys, subcommand, *DEMO, *args)
    assert suggestion in err, err
    assert len(err.splitlines()) < 15  # no page-long usage block


@pytest.mark.parametrize(
    ("yaml_text", "suggestion"),
    [
        ("model:\n  net:\n    window_sise: 4\n", "Did you mean 'window_size'?"),
        ("trainer:\n  max_epohcs: 3\n", "Did you mean 'trainer.max_epochs'?"),
        ("modle:\n  label_smoothing: 0.2\n", "Did you mean 'model.label_smoothing'?"),
    ],
)
def test_unknown_key_in_yaml_suggests_the_closest(yaml_text, suggestion, in_tmp, capsys):
    (in_tmp / "typo.yaml").write_text(yaml_text)
    err = fails(capsys, "fit", *DEMO, "--config", str(in_tmp / "typo.yaml"))
    assert suggestion in err, err


def test_missing_image_folder(in_tmp, capsys):
    err = fails(capsys, "fit", *images_args(in_tmp / "nowhere"))
    assert f"dataset folder {in_tmp / 'nowhere' / 'train'} does not exist" in err
    assert "root/train/<class>/<image>" in err and "data.root" in err
    assert nothing_trained(in_tmp)


def test_empty_image_folder(in_tmp, capsys):
    (in_tmp / "images" / "train").mkdir(parents=True)
    err = fails(capsys, "fit", *images_args(in_tmp / "images"))
    assert "holds no class folders" in err and "/<class>/<image>" in err
    assert nothing_trained(in_tmp)


def test_class_folders_differ_between_train_and_val(in_tmp, capsys):
    root = write_imagefolder(in_tmp / "images", classes=("cat", "dog"), per_class=2, size=32)
    shutil.move(root / "val" / "dog", root / "val" / "owl")
    err = fails(capsys, "fit", *images_args(root))  # found in setup, before the first batch
    assert "only in train: ['dog']; only in val: ['owl']" in err
    assert nothing_trained(in_tmp)


def test_missing_cifar(in_tmp, capsys):
    err = fails(capsys, "fit", "--config", str(CONFIGS / "cifar10.yaml"), *ONE_STEP,
                f"--data.init_args.data_dir={in_tmp / 'nowhere'}", "--data.init_args.download=false",
                "--data.init_args.num_workers=0")  # fmt: skip
    assert f"no dataset at {in_tmp / 'nowhere' / 'cifar-10-batches-py'}" in err
    assert "data.download: true" in err
    assert nothing_trained(in_tmp)


def corrupt_tree(root: Path) -> tuple[Path, Path]:
    """An image tree with one undecodable and one truncated training image."""
    write_imagefolder(root, classes=("cat", "dog"), per_class=4, size=32)
    garbage, truncated = root / "train" / "cat" / "0.png", root / "train" / "dog" / "1.png"
    garbage.write_bytes(b"not an image")
    truncated.write_bytes(truncated.read_bytes()[:200])
    return garbage, truncated


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_is_named(workers, in_tmp, capsys):
    corrupt_tree(in_tmp / "images")
    err = fails(capsys, "fit", *images_args(in_tmp / "images"),
                f"--data.init_args.num_workers={workers}", "--data.init_args.batch_size=8")  # fmt: skip
    assert re.search(r"corrupt or unreadable image \S+/train/(cat/0|dog/1)\.png", err), err
    assert "data.skip_corrupt: true" in err
    assert nothing_trained(in_tmp)


def test_skip_corrupt_trains_and_counts(in_tmp):
    garbage, truncated = corrupt_tree(in_tmp / "images")
    with pytest.warns(UserWarning, match="skip_corrupt: skipped unreadable image") as record:
        cli = run_cli("fit", *images_args(in_tmp / "images"), "--data.init_args.skip_corrupt=true",
                      "--trainer.max_steps=2")  # fmt: skip  # 2 batches of 4: every image read
    assert cli.trainer.global_step == 2
    train_set = cli.datamodule.train_set
    assert train_set.num_skipped == 2 and len(train_set) == 8
    messages = [str(w.message) for w in record if "skip_corrupt" in str(w.message)]
    assert any(str(garbage) in m for m in messages) and any(str(truncated) in m for m in messages)
    assert any("2 of 8 files" in m for m in messages)


def test_pretrained_weights_that_do_not_fit(in_tmp, capsys):
    other = SwinTransformer(img_size=32, patch_size=2, embed_dim=24, depths=[2, 2],
                            num_heads=[3, 6], window_size=4, num_classes=10)  # fmt: skip
    torch.save(other.state_dict(), in_tmp / "other.pth")
    err = fails(capsys, "fit", *DEMO, f"--model.pretrained={in_tmp / 'other.pth'}")
    assert "does not fit the model; mismatched shapes" in err
    assert "patch_embed.proj.weight: checkpoint (24, 3, 2, 2) vs model (48, 3, 2, 2)" in err
    assert nothing_trained(in_tmp)


def test_ckpt_path_that_does_not_fit(in_tmp, capsys):
    run_cli("fit", *DEMO)
    ckpt = next(in_tmp.rglob("last.ckpt"))
    err = fails(capsys, "validate", *DEMO, "--model.net.embed_dim=24", f"--ckpt_path={ckpt}")
    assert "ckpt_path: the checkpoint does not fit the configured model" in err
    assert "net.patch_embed.proj.weight: checkpoint (48, 3, 2, 2) vs model (24, 3, 2, 2)" in err
    assert "net.head.weight: checkpoint (10, 96) vs model (10, 48)" in err
