"""Every YAML under configs/ parses; every complete config trains one batch on its data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from swin_lightning.models import create_model
from tests.conftest import CONFIGS, run_cli, write_cifar, write_imagefolder

# Ablation specs (configs/ablations/specs) and search specs (configs/search) are not CLI
# configs: tests/test_ablation.py, test_launchers.py and test_tune.py read them.
ALL_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if not {"specs", "search"} & set(p.parts))
COMPLETE = [p for p in ALL_CONFIGS if {"model", "data"} <= set(yaml.safe_load(p.read_text()))]
OVERLAYS = [p for p in ALL_CONFIGS if p not in COMPLETE]


def config_id(path):
    return str(path.relative_to(CONFIGS))


def data_args(config, tmp_path) -> list[str]:
    """Point a complete config at data generated in its real on-disk format."""
    name = config_id(config)
    data_class = yaml.safe_load(config.read_text())["data"]["class_path"].rsplit(".", 1)[-1]
    if data_class in ("CIFAR10DataModule", "CIFAR100DataModule"):
        write_cifar(tmp_path / "data", hundred=data_class == "CIFAR100DataModule")
        return [f"--data.init_args.data_dir={tmp_path / 'data'}", "--data.init_args.download=false"]
    if data_class == "ImageFolderDataModule":
        fmt = "jpg" if name.startswith("imagenet") else "png"
        write_imagefolder(tmp_path / "images", fmt=fmt)
        return [f"--data.init_args.root={tmp_path / 'images'}"]
    return []


def test_configs_found():
    names = {config_id(p) for p in ALL_CONFIGS}
    assert {"demo.yaml", "cifar10.yaml", "cifar100.yaml", "imagefolder.yaml"} <= names
    assert {f"imagenet/swin_{s}.yaml" for s in "tsbl"} | {"imagenet/swinv2_t.yaml"} <= names
    assert {f"models/swinv2_{s}.yaml" for s in "tsb"} <= names
    assert {"ablations/no_shift.yaml", "trainer/fast_dev_run.yaml", "trainer/ddp.yaml"} <= names
    assert {"trainer/fsdp.yaml", "trainer/ddp_cpu.yaml", "trainer/multinode.yaml"} <= names
    assert {"finetune/swin_t_384.yaml", "finetune/imagenet_to_cifar10.yaml"} <= names
    assert {
        f"simmim/{p}_{d}.yaml" for p in ("pretrain", "finetune") for d in ("demo", "swin_t")
    } <= names


@pytest.mark.parametrize("config", COMPLETE, ids=config_id)
def test_complete_config_parses(config, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", str(config), *data_args(config, tmp_path), "--print_config")
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"].get("init_args", printed["model"])  # SimMIM: class_path + init_args
    assert model["net"]["class_path"] == "swin_lightning.models.SwinTransformer"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=config_id)
def test_overlay_composes_with_demo(overlay, capsys):
    with pytest.raises(SystemExit):
        run_cli("fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(overlay),
                "--print_config")  # fmt: skip
    printed = yaml.safe_load(capsys.readouterr().out)
    wanted = yaml.safe_load(overlay.read_text())
    for section, values in wanted.items():
        target = printed[section]["net"]["init_args"] if "net" in values else printed[section]
        for key, value in values.get("net", values).items():
            if key.endswith("+"):  # appended to the list of the configs before it
                key, printed_list = key[:-1], target[key[:-1]]
                assert _composed(printed_list[-len(value) :], value), (section, key)
                continue
            assert _composed(target[key], value), (section, key)


# print_config cannot write sets of classes (FSDP's wrap policy): test_fsdp_overlay checks it.
UNPRINTABLE = {"auto_wrap_policy"}


def _composed(printed, wanted) -> bool:
    """The overlay's value is in the printed config (a class's init_args print in full)."""
    if isinstance(wanted, dict) and isinstance(printed, dict):
        keys = set(wanted) - UNPRINTABLE
        return all(k in printed and _composed(printed[k], wanted[k]) for k in keys)
    if isinstance(wanted, list) and isinstance(printed, list) and len(wanted) == len(printed):
        return all(_composed(p, w) for p, w in zip(printed, wanted, strict=True))
    return printed == wanted


def test_fsdp_overlay_wraps_each_swin_block():
    from swin_lightning.classifier import SwinClassifier
    from swin_lightning.cli import SwinCLI
    from swin_lightning.data import ClassificationDataModule
    from swin_lightning.models.swin import SwinBlock

    class Parsed(Exception):
        pass

    class ParseOnly(SwinCLI):  # FSDP needs GPUs to instantiate: stop after parsing
        def before_instantiate_classes(self) -> None:
            raise Parsed(self.config)

    args = ["--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "trainer/fsdp.yaml")]
    with pytest.raises(Parsed) as parsed:
        ParseOnly(SwinClassifier, ClassificationDataModule, subclass_mode_data=True,
                  auto_configure_optimizers=False, args=args, run=False)  # fmt: skip
    strategy = parsed.value.args[0].trainer.strategy
    assert strategy.class_path == "lightning.pytorch.strategies.FSDPStrategy"
    assert strategy.init_args.auto_wrap_policy == {SwinBlock}
    assert strategy.init_args.state_dict_type == "full"


def _fast_dev_run(config, tmp_path, *extra):
    cli = run_cli(
        "fit", "--config", str(config), *data_args(config, tmp_path),
        "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu",
        "--data.init_args.num_workers=0", "--data.init_args.batch_size=4", *extra,
    )  # fmt: skip
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1
    return cli


# Fine-tuning configs name a weights file the user provides (model.pretrained).
FINETUNE = [p for p in COMPLETE if yaml.safe_load(p.read_text())["model"].get("pretrained")]
FAST = [p for p in COMPLETE if not config_id(p).startswith("imagenet") and p not in FINETUNE]
IMAGENET = [p for p in COMPLETE if config_id(p).startswith("imagenet")]


@pytest.mark.parametrize("config", FAST, ids=config_id)
def test_fast_dev_run(config, in_tmp):
    cli = _fast_dev_run(config, in_tmp)
    data = cli.datamodule
    pretraining = "class_path" in yaml.safe_load(config.read_text())["model"]
    assert cli.model.net.num_classes == (0 if pretraining else data.num_classes)
    assert cli.model.net.img_size == (data.image_size, data.image_size)


@pytest.mark.slow
@pytest.mark.parametrize("config", IMAGENET, ids=config_id)
def test_fast_dev_run_imagenet_recipes(config, in_tmp):
    # Two blocks per stage: the recipe's widths, heads, window and training parts run; the
    # 18-block third stage of S/B/L repeats the same block (its shapes: test_model_shapes.py)
    # and made Swin-L's one step cost 17 s of optimizer state for 197M parameters.
    cli = _fast_dev_run(config, in_tmp, "--data.init_args.image_size=64",
                        "--model.net.depths=[2,2,2,2]")  # fmt: skip
    assert cli.model.mixup is not None and cli.trainer.gradient_clip_val == 5.0
    net = yaml.safe_load(config.read_text())["model"]["net"]
    assert cli.model.net.patch_embed.proj.out_channels == net["embed_dim"]
    heads = [stage.blocks[0].attn.num_heads for stage in cli.model.net.layers]
    assert heads == net["num_heads"]
    assert cli.model.net.layers[0].blocks[0].window_size == (net["window_size"],) * 2


@pytest.mark.slow
@pytest.mark.parametrize("config", FINETUNE, ids=config_id)
def test_fast_dev_run_finetune_recipes(config, in_tmp):
    # Stand-in for the ImageNet Swin-T weights the configs expect: same shapes, random values.
    weights = in_tmp / "swin_tiny_patch4_window7_224.pth"
    if "simmim" in config_id(config):  # a SimMIM encoder: 192 px, window 6, no head
        weights = in_tmp / "simmim_swin_t.ckpt"
        encoder = create_model("swin_t", img_size=192, window_size=6, num_classes=0)
        state = {f"net.{k}": v for k, v in encoder.state_dict().items()}
        state["mask_token"] = torch.zeros(1, 1, 1, 96)
        torch.save({"state_dict": state}, weights)
    else:
        torch.save(create_model("swin_t", num_classes=1000).state_dict(), weights)
    cli = _fast_dev_run(
        config, in_tmp, f"--model.pretrained={weights}", "--data.init_args.image_size=64"
    )
    report = cli.model.pretrained_report
    assert report.reinitialized == ["head.bias", "head.weight"]  # 1000 classes -> 3 or 10
    assert report.resized and not report.missing and not report.unexpected


DEBUG_PRESETS = ["trainer/overfit.yaml", "trainer/limit.yaml", "trainer/profile.yaml"]


@pytest.mark.parametrize("preset", DEBUG_PRESETS)
def test_debug_presets_set_what_they_say_and_run(preset, in_tmp):
    # The trainer and model built from demo + preset carry every setting of the preset (a
    # fast_dev_run alone would override them, so they are checked on the built objects).
    import yaml
    from lightning.pytorch.profilers import PyTorchProfiler

    from swin_lightning.models.swin import DropPath

    overlay = yaml.safe_load((CONFIGS / preset).read_text())
    cli = run_cli("--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / preset),
                  run=False)  # fmt: skip
    for key, value in overlay["trainer"].items():
        if key == "profiler":
            assert isinstance(cli.trainer.profiler, PyTorchProfiler)
            assert cli.trainer.profiler.filename == value["init_args"]["filename"]
        else:
            assert getattr(cli.trainer, key) == value, key
    model = overlay.get("model", {})
    if "lr_scheduler" in model:
        assert cli.model.scheduler_factory is None
    for key in ("label_smoothing", "mixup_alpha", "cutmix_alpha"):
        if key in model:
            assert cli.model.hparams[key] == model[key], key
    if "mixup_alpha" in model:
        assert cli.model.mixup is None
    if "drop_path_rate" in model.get("net", {}):
        rates = [m.drop_prob for m in cli.model.net.modules() if isinstance(m, DropPath)]
        assert rates and all(r == model["net"]["drop_path_rate"] for r in rates)
    _fast_dev_run(CONFIGS / "demo.yaml", in_tmp, "--config", str(CONFIGS / preset))


def _train_losses(run_dir) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [s.value for s in events.Scalars("train/loss")]


@pytest.mark.slow
def test_overfit_preset_drives_the_loss_near_zero(in_tmp):
    from tests.conftest import TINY_DEMO

    cli = run_cli("fit", *(a for a in TINY_DEMO if not a.startswith("--trainer.max_epochs")),
                  "--config", str(CONFIGS / "trainer/overfit.yaml"))  # fmt: skip
    losses = _train_losses(cli.trainer.log_dir)
    assert len(losses) == 100  # 2 batches x 50 epochs, every step logged
    assert losses[0] > 1.5 and losses[-1] < 0.05, (losses[0], losses[-1])


def test_limit_and_profile_presets_run_and_write_a_trace(in_tmp):
    import json

    from tests.conftest import TINY_DEMO

    cli = run_cli("fit", *TINY_DEMO, "--config", str(CONFIGS / "trainer/limit.yaml"),
                  "--config", str(CONFIGS / "trainer/profile.yaml"),
                  "--data.init_args.train_size=256")  # fmt: skip
    assert cli.trainer.global_step == 10 and cli.trainer.current_epoch == 1
    run_dir = Path(cli.trainer.log_dir)
    # Lightning exports the training steps' trace in some runs only (validation's in all).
    traces = list(run_dir.glob("fit-profile-*.pt.trace.json"))
    assert traces, "\n".join(p.name for p in run_dir.iterdir())
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("aten::" in e.get("name", "") for e in events)  # operators were recorded
    assert "Name" in (run_dir / "fit-profile.txt").read_text()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()  # a real run, unlike fast_dev_run
