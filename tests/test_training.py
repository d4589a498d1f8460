"""Training behaviour through the CLI: schedule, weight decay, Mixup, logs, resume, predict."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from swin_lightning.models import create_model
from swin_lightning.optimization import weight_decay_groups
from swin_lightning.schedules import WarmupCosineLR, WarmupMultiStepLR, WarmupStepLR
from tests.conftest import CONFIGS, REPO, TINY_DEMO, run_cli, write_imagefolder


def lrs_of(scheduler_cls, steps: int, **kwargs) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = scheduler_cls(opt, total_steps=steps, **kwargs)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_cosine_shape():
    lrs = lrs_of(WarmupCosineLR, 100, steps_per_epoch=10, warmup_epochs=2,
                 warmup_start_factor=0.01, min_lr=0.05)  # fmt: skip
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[10] == pytest.approx(0.01 + 0.99 * 10 / 20)  # linear warmup
    assert lrs[20] == pytest.approx(1.0)  # peak right after warmup
    assert all(a >= b for a, b in itertools.pairwise(lrs[20:]))  # then monotone down
    midpoint = 20 + (99 - 20) / 2
    assert lrs[round(midpoint)] == pytest.approx(0.05 + 0.95 * 0.5, abs=0.02)  # cosine half
    assert lrs[-1] == pytest.approx(0.05)  # min_lr reached at the last step


def test_step_and_multistep_shapes():
    step = lrs_of(WarmupStepLR, 40, steps_per_epoch=4, step_epochs=3, gamma=0.5)
    assert step[0] == 1.0 and step[11] == 1.0 and step[12] == 0.5 and step[24] == 0.25
    multi = lrs_of(WarmupMultiStepLR, 40, steps_per_epoch=4, milestones=[2, 5], gamma=0.1)
    assert multi[7] == 1.0 and multi[8] == pytest.approx(0.1) and multi[20] == pytest.approx(0.01)


class RecordLR(L.Callback):
    def __init__(self):
        self.lrs, self.first_step = [], None

    def on_train_start(self, trainer, pl_module):
        self.first_step = trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def test_schedule_is_sized_from_trainer_with_accumulation(in_tmp):
    # 3 epochs x 6 batches, accumulating 2 -> 3 optimizer steps per epoch, 9 in all.
    cli = run_cli(
        "fit", *TINY_DEMO, "--data.init_args.train_size=160", "--trainer.max_epochs=3",
        "--trainer.limit_train_batches=6",
        "--trainer.accumulate_grad_batches=2", "--trainer.limit_val_batches=1",
        "--model.lr_scheduler.init_args.warmup_epochs=1",
        "--model.lr_scheduler.init_args.min_lr=0.0001",
        "--model.lr_scheduler.init_args.warmup_start_factor=0.1",
        "--trainer.callbacks+=tests.test_training.RecordLR",
    )  # fmt: skip
    sched = cli.trainer.lr_scheduler_configs[0].scheduler
    assert (sched.total_steps, sched.steps_per_epoch, sched.warmup_steps) == (9, 3, 3)
    record = next(c for c in cli.trainer.callbacks if isinstance(c, RecordLR))
    peak = 0.002
    expected = [peak * (0.1 + 0.9 * s / 3) for s in range(3)]
    expected += [
        1e-4 + (peak - 1e-4) * 0.5 * (1 + math.cos(math.pi * (s - 3) / 5)) for s in range(3, 9)
    ]
    assert record.lrs == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("class_path", "extra"),
    [
        ("swin_lightning.schedules.WarmupCosineLR", []),
        ("swin_lightning.schedules.WarmupLinearLR", []),
        ("swin_lightning.schedules.WarmupLR", []),
        ("swin_lightning.schedules.WarmupStepLR", ["--model.lr_scheduler.init_args.step_epochs=1"]),
        ("swin_lightning.schedules.WarmupMultiStepLR",
         ["--model.lr_scheduler.init_args.milestones=[1]"]),
        ("torch.optim.lr_scheduler.OneCycleLR", ["--model.lr_scheduler.init_args.max_lr=0.01"]),
    ],
)  # fmt: skip
def test_every_schedule_is_sized_by_the_trainer(in_tmp, class_path, extra):
    cli = run_cli("fit", *TINY_DEMO, f"--model.lr_scheduler={class_path}", *extra,
                  "--trainer.limit_val_batches=1")  # fmt: skip
    sched = cli.trainer.lr_scheduler_configs[0].scheduler
    assert cli.trainer.lr_scheduler_configs[0].interval == "step"
    assert sched.total_steps == cli.trainer.global_step == 8
    assert sched.last_epoch == 8  # stepped once per optimizer step


def test_weight_decay_groups_exclude_norms_biases_and_position_tables():
    model = create_model("swin_cifar", num_classes=10, pos_embed="abs+rel")
    decay, no_decay = weight_decay_groups(model, model.no_weight_decay_keywords())
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay
    assert decayed | skipped == set(names.values()) and not decayed & skipped
    for name in skipped:
        assert name.endswith(("bias", "relative_position_bias_table", "absolute_pos_embed")) or (
            "norm" in name and name.endswith("weight")
        ), name
    for name in decayed:
        assert name.endswith("weight") and "norm" not in name, name
    assert "absolute_pos_embed" in skipped
    assert "layers.0.blocks.0.attn.relative_position_bias_table" in skipped
    assert "layers.0.blocks.0.attn.qkv.weight" in decayed and "patch_embed.proj.weight" in decayed


def test_fsdp_clips_by_the_global_norm_and_other_strategies_by_lightning(monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from swin_lightning.classifier import SwinClassifier

    module = SwinClassifier(
        create_model("swin_cifar", num_classes=10, depths=(1, 1), num_heads=(3, 6))
    )
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    clipped: list[float] = []
    fsdp = FSDPStrategy()  # needs no GPU until it sets up
    fsdp._model = SimpleNamespace(clip_grad_norm_=clipped.append)
    module._trainer = SimpleNamespace(strategy=fsdp)
    lightning_clip: list[tuple] = []
    monkeypatch.setattr(module, "clip_gradients", lambda *args: lightning_clip.append(args))
    module.configure_gradient_clipping(optimizer, 5.0, "norm")
    module.configure_gradient_clipping(optimizer, 5.0, None)  # the trainer's default: norm
    assert clipped == [5.0, 5.0] and not lightning_clip
    module.configure_gradient_clipping(optimizer, 0.5, "value")  # Lightning supports value
    module.configure_gradient_clipping(optimizer, None, None)  # clipping off
    module._trainer = SimpleNamespace(strategy=DDPStrategy())
    module.configure_gradient_clipping(optimizer, 5.0, "norm")
    assert clipped == [5.0, 5.0]
    assert lightning_clip == [
        (optimizer, 0.5, "value"),
        (optimizer, None, None),
        (optimizer, 5.0, "norm"),
    ]


def test_linear_lr_scaling(in_tmp):
    # global batch 16 x accumulate 2 = 32; scaled by 32 / 64 -> half the configured 0.002
    cli = run_cli("fit", *TINY_DEMO, "--trainer.max_epochs=1", "--trainer.accumulate_grad_batches=2",
                  "--model.lr_scale_batch_size=64", "--model.lr_scheduler=null")  # fmt: skip
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.001)


def test_mixup_path_trains(in_tmp):
    cli = run_cli("fit", *TINY_DEMO, "--trainer.max_epochs=1", "--model.mixup_alpha=0.8",
                  "--model.cutmix_alpha=1.0")  # fmt: skip
    assert type(cli.model.train_loss).__name__ == "SoftTargetCrossEntropy"
    assert cli.model.mixup.mixup_alpha == 0.8 and cli.model.mixup.cutmix_alpha == 1.0
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    assert cli.trainer.global_step == 4


def events(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


def test_tensorboard_logs_and_versioned_runs(in_tmp):
    first = run_cli("fit", *TINY_DEMO, "--throughput.window_size=2")
    second = run_cli("fit", *TINY_DEMO, "--trainer.max_epochs=1")
    log_dir = in_tmp / "logs" / "demo"
    assert (in_tmp / first.trainer.log_dir).resolve() == log_dir / "version_0"
    assert (in_tmp / second.trainer.log_dir).resolve() == log_dir / "version_1"  # new folder
    tags = set(events(log_dir / "version_0").Tags()["scalars"])
    wanted = {"train/loss", "train/acc1", "train/acc5", "val/loss", "val/acc1", "val/acc5",
              "lr-AdamW/pg1", "train/device/samples_per_sec", "cost/wall_seconds",
              "cost/peak_mem_mb", "cost/gpus", "cost/cpu_threads"}  # fmt: skip
    assert wanted <= tags, wanted - tags
    assert (log_dir / "version_0" / "config.yaml").is_file()
    ckpts = {p.name for p in (log_dir / "version_0" / "checkpoints").iterdir()}
    # The best checkpoint is named after the epoch with the best val top-1 (the first of ties).
    accs = [e.value for e in events(log_dir / "version_0").Scalars("val/acc1")]
    best = accs.index(max(accs))
    assert "last.ckpt" in ckpts and f"epoch{best:03d}-acc1_{max(accs):.4f}.ckpt" in ckpts, ckpts


def test_resume_from_last_checkpoint(in_tmp):
    run_cli("fit", *TINY_DEMO)  # 2 epochs x 4 steps
    last = in_tmp / "logs" / "demo" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 8
    cli = run_cli("fit", *TINY_DEMO, "--trainer.max_epochs=3", f"--ckpt_path={last}",
                  "--trainer.callbacks+=tests.test_training.RecordLR")  # fmt: skip
    record = next(c for c in cli.trainer.callbacks if isinstance(c, RecordLR))
    assert record.first_step == 8 and len(record.lrs) == 4
    assert cli.trainer.global_step == 12 and cli.trainer.current_epoch == 3


def test_validate_test_and_predict_csv(in_tmp):
    fit = run_cli("fit", *TINY_DEMO, "--trainer.max_epochs=1")
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    base = ["--config", str(CONFIGS / "demo.yaml"), "--data.init_args.val_size=32",
            "--data.init_args.test_size=32", f"--ckpt_path={ckpt}"]  # fmt: skip
    val = run_cli("validate", *base)
    assert 0.0 <= float(val.trainer.callback_metrics["val/acc1"]) <= 1.0
    test = run_cli("test", *base)
    assert "test/acc5" in test.trainer.callback_metrics
    images = write_imagefolder(in_tmp / "imgs", per_class=2, size=48) / "val"
    out = in_tmp / "preds.csv"
    run_cli("predict", *base, f"--data.init_args.predict_dir={images}",
            f"--prediction_writer.output={out}", "--prediction_writer.top_k=3")  # fmt: skip
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and set(rows[0]) == {"path", "class_1", "prob_1", "class_2",
                                               "prob_2", "class_3", "prob_3"}  # fmt: skip
    shapes = set(fit.datamodule.classes)
    for row in rows:
        probs = [float(row[f"prob_{j}"]) for j in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-5
        assert {row["class_1"], row["class_2"], row["class_3"]} <= shapes


@pytest.mark.slow
def test_demo_learns(in_tmp):
    # The demo as shipped, stopped by Lightning's EarlyStopping as soon as validation passes
    # the bar (epoch 3 of 8 here, a third of the run), so the test pays only for what it shows.
    stop = {"class_path": "lightning.pytorch.callbacks.EarlyStopping",
            "init_args": {"monitor": "val/acc1", "mode": "max", "stopping_threshold": 0.5,
                          "patience": 100}}  # fmt: skip
    cli = run_cli("fit", "--config", str(CONFIGS / "demo.yaml"),
                  f"--trainer.callbacks+={json.dumps(stop)}")  # fmt: skip
    acc = float(cli.trainer.callback_metrics["val/acc1"])
    assert acc > 0.5, (
        f"demo val top-1 {acc:.3f} after {cli.trainer.current_epoch} epochs; chance is 0.1"
    )


def test_bf16_overlay_trains_on_the_cpu(in_tmp):
    # configs/trainer/bf16.yaml on a CPU, with V2's cosine attention and position bias too.
    cli = run_cli("fit", *TINY_DEMO, "--config", str(CONFIGS / "trainer" / "bf16.yaml"),
                  "--trainer.max_epochs=1", "--model.net.attention=cosine",
                  "--model.net.pos_embed=cpb")  # fmt: skip
    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.state.finished
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])


@pytest.mark.slow
def test_fit_and_test_print_no_advert_or_warning_the_user_cannot_act_on(in_tmp):
    # As a user runs them: separate processes, everything they print.
    def run(*args):
        done = subprocess.run([sys.executable, "-m", "swin_lightning", *args, *TINY_DEMO],
                              cwd=in_tmp, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout + done.stderr

    printed = run("fit") + run("test", "--ckpt_path", "last")
    assert "Test metric" in printed  # the runs did print their own output
    for noise in ("Tip: For seamless cloud", "dirpath has changed", "LeafSpec",
                  "callbacks used to create the checkpoint"):  # fmt: skip
        assert noise not in printed, noise
