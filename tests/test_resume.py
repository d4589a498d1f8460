"""Crash safety: a fit stopped by SIGKILL, SIGTERM or SIGINT (with EMA too) resumes exactly with
``--ckpt_path last``; NaN loss, auto-resume, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from swin_lightning.callbacks import RunCostMonitor
from swin_lightning.resilience import NonFiniteLossError
from tests.conftest import CONFIGS, QUIET, REPO, TINY_DEMO, run_cli

# 3 epochs x 4 optimizer steps, last.ckpt every 2 steps.
RUN = [*TINY_DEMO, "--trainer.max_epochs=3", "--step_checkpoint.every_n_train_steps=2"]
STEPS = 12
RECORD = "--trainer.callbacks+=tests.test_resume.RecordBatches"


class KillAt(L.Callback):
    """Test helper: the process sends itself ``signum`` right after optimizer step ``step``."""

    def __init__(self, step: int, signum: int = int(signal.SIGKILL)):
        self.step = step
        self.signum = signum

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class RecordBatches(L.Callback):
    """Test helper: the targets of every training batch, by the step they are trained at."""

    def __init__(self):
        self.targets: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.targets[trainer.global_step] = batch[1].tolist()


class PoisonAt(L.Callback):
    """Test helper: NaN images in the batch trained at ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            batch[0].fill_(float("nan"))


def callback(name: str, **init_args) -> str:
    """``--trainer.callbacks+=`` one of this module's helpers, with its arguments."""
    spec = {"class_path": f"tests.test_resume.{name}", "init_args": init_args}
    return f"--trainer.callbacks+={json.dumps(spec)}"


def fit_subprocess(*args: str, cwd: Path, quiet: bool = True) -> subprocess.CompletedProcess:
    """``python -m swin_lightning fit`` in a fresh interpreter (as a job would run it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "swin_lightning", "fit", *args, *(QUIET if quiet else [])]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(log_dir))  # honours purge_step, as TensorBoard does
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def step_of(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


def assert_same_as_reference(cli, reference, log_dir: Path) -> None:
    assert cli.trainer.global_step == reference["step"] == STEPS
    weights = cli.model.state_dict()
    different = [k for k, v in reference["weights"].items() if not torch.equal(weights[k], v)]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    for key in ("val/acc1", "val/loss", "train/loss", "train/acc1"):
        assert metrics[key] == reference["metrics"][key], key
    # The resumed run's TensorBoard folder reads as one clean run: the steps logged after the
    # checkpoint by the killed process are hidden (purge_step) and logged again.
    for tag in ("train/loss", "val/acc1", "lr-AdamW/pg1"):
        assert scalars(log_dir, tag) == scalars(reference["log_dir"], tag), tag


EMA = ["--config", str(CONFIGS / "callbacks" / "ema.yaml"),
       "--trainer.callbacks.init_args.decay=0.9"]  # fmt: skip


class Stop(NamedTuple):
    """A way a fit is stopped, and what it must leave behind."""

    signum: int
    at_step: int  # the process signals itself right after this optimizer step
    exit_code: int
    saved_step: int  # of last.ckpt after the stop
    message: str | None  # what it prints on the way out (SIGKILL: nothing can be printed)
    extra: tuple[str, ...] = ()  # settings of the run (the reference run has them too)


# last.ckpt is written every 2 steps (RUN). SIGKILL loses the steps after the newest of those;
# SIGTERM (a scheduler's stop) and SIGINT (Ctrl+C) save the step they arrive at, an odd one,
# so the checkpoint can only be their own save.
STOPS = {
    "SIGKILL": Stop(signal.SIGKILL, 7, -signal.SIGKILL, 6, None),
    "SIGTERM": Stop(signal.SIGTERM, 5, 143, 5, "SIGTERM: saved"),
    "SIGINT": Stop(signal.SIGINT, 5, 130, 5, "SIGINT (Ctrl+C): saved"),
    # configs/callbacks/ema.yaml: the weight average resumes too
    "SIGKILL, EMA": Stop(signal.SIGKILL, 7, -signal.SIGKILL, 6, None, tuple(EMA)),
}


def ema_average(cli) -> tuple[dict[str, torch.Tensor], int]:
    ema = next(c for c in cli.trainer.callbacks if isinstance(c, EMAWeightAveraging))
    model = ema._average_model
    return {k: v.clone() for k, v in model.module.state_dict().items()}, int(model.n_averaged)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The uninterrupted run each stopped run must reproduce, one per settings (cached)."""
    cache: dict[tuple[str, ...], dict] = {}

    def get(extra: tuple[str, ...]) -> dict:
        if extra not in cache:
            root = tmp_path_factory.mktemp("reference")
            cli = run_cli("fit", *RUN, *extra, RECORD,
                          f"--trainer.logger.init_args.save_dir={root}")  # fmt: skip
            record = next(c for c in cli.trainer.callbacks if isinstance(c, RecordBatches))
            ema = any(isinstance(c, EMAWeightAveraging) for c in cli.trainer.callbacks)
            cache[extra] = {
                "ema": ema_average(cli) if ema else None,
                "step": cli.trainer.global_step,
                "weights": {k: v.clone() for k, v in cli.model.state_dict().items()},
                "metrics": {k: float(v) for k, v in cli.trainer.callback_metrics.items()},
                "targets": record.targets,
                "log_dir": Path(cli.trainer.log_dir),
            }
        return cache[extra]

    return get


def assert_ema_reference(reference: dict) -> None:
    """EMA: validation and the checkpoint hold the average, which differs from the raw
    weights it follows, and it is updated once per optimizer step."""
    want, want_n = reference["ema"]
    assert want_n == STEPS
    raw = reference["weights"]  # at the end the model holds the average (what test uses)
    assert all(torch.equal(raw[k], want[k]) for k in want)
    saved = torch.load(reference["log_dir"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.equal(saved["state_dict"][k], want[k]) for k in want)
    assert any(not torch.equal(saved["current_model_state"][k], want[k]) for k in want)


@pytest.mark.parametrize("case", list(STOPS))
def test_a_stopped_fit_saves_and_resumes_exactly(case, in_tmp, references):
    stop = STOPS[case]
    reference = references(stop.extra)
    stopped = fit_subprocess(*RUN, *stop.extra,
                             callback("KillAt", step=stop.at_step, signum=int(stop.signum)),
                             cwd=in_tmp)  # fmt: skip
    assert stopped.returncode == stop.exit_code, stopped.stderr[-3000:]
    if stop.message:
        assert stop.message in stopped.stderr and "--ckpt_path last" in stopped.stderr
    run_dir = in_tmp / "logs" / "demo" / "version_0"
    last = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    epoch, batches = divmod(stop.saved_step, STEPS // 3)  # mid-epoch 1
    assert (state["global_step"], state["epoch"]) == (stop.saved_step, epoch)
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": epoch, "batches": batches}
    ]
    assert {"torch", "numpy", "python"} <= set(state["callbacks"]["ResumeState"]["rng"])
    saved_seconds = state["callbacks"]["RunCostMonitor"]["wall_seconds"]
    assert saved_seconds > 0  # epoch 0's time, carried in the checkpoint

    cli = run_cli("fit", *RUN, *stop.extra, RECORD, "--ckpt_path=last")
    assert Path(cli.trainer.log_dir).resolve() == run_dir
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"]
    cost = next(c for c in cli.trainer.callbacks if isinstance(c, RunCostMonitor))
    assert cost.wall_seconds > saved_seconds  # the resumed epochs add to the saved time
    record = next(c for c in cli.trainer.callbacks if isinstance(c, RecordBatches))
    # Same batches, in the same order, from the first step after the checkpoint on.
    want = {s: t for s, t in reference["targets"].items() if s >= stop.saved_step}
    assert record.targets == want
    if reference["ema"] is not None:
        assert_ema_reference(reference)
        got, got_n = ema_average(cli)
        want_avg, want_n = reference["ema"]
        assert cli.trainer.global_step == STEPS and got_n == want_n
        for k in want_avg:
            torch.testing.assert_close(got[k], want_avg[k], rtol=1e-5, atol=1e-6, msg=k)
    else:
        assert_same_as_reference(cli, reference, run_dir)
    assert step_of(last) == STEPS


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(in_tmp):
    cli = run_cli(*RUN, callback("PoisonAt", step=5), *QUIET, run=False)
    with pytest.raises(NonFiniteLossError) as err:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    message = str(err.value)
    last = in_tmp / "logs" / "demo" / "version_0" / "checkpoints" / "last.ckpt"
    assert message.startswith("Training loss is nan at global step 5 (epoch 1, batch 1)")
    assert "logs/demo/version_0/checkpoints/last.ckpt, was not overwritten" in message
    for hint in ("lr", "gradient_clip_val", "bf16"):
        assert hint in message
    # Stopped before the optimizer step: the weights in memory and on disk are finite.
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 4
    assert all(
        torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point()
    )
    assert not any(p.name.startswith("epoch001") for p in last.parent.iterdir())


def test_auto_resume_finds_the_newest_run(in_tmp, capsys):
    one_epoch = [*TINY_DEMO, "--trainer.max_epochs=1", "--trainer.limit_val_batches=1"]
    runs = in_tmp / "logs" / "demo"
    fresh = run_cli("fit", *one_epoch, "--ckpt_path=auto")  # nothing to resume: a new run
    assert Path(fresh.trainer.log_dir).resolve() == runs / "version_0"
    assert fresh.trainer.ckpt_path is None and fresh.trainer.global_step == 4
    second = run_cli("fit", *one_epoch)
    assert Path(second.trainer.log_dir).resolve() == runs / "version_1"

    two_epochs = [*one_epoch, "--trainer.max_epochs=2"]
    auto = run_cli("fit", *two_epochs, "--ckpt_path=auto")  # the newest: version_1
    assert Path(auto.trainer.ckpt_path).resolve() == runs / "version_1/checkpoints/last.ckpt"
    assert Path(auto.trainer.log_dir).resolve() == runs / "version_1"
    assert auto.trainer.global_step == 8

    # An explicit last.ckpt logs into its own run; an older checkpoint starts a new folder,
    # so the run it came from is never overwritten.
    explicit = run_cli("fit", *two_epochs, "--ckpt_path=logs/demo/version_0/checkpoints/last.ckpt")
    assert Path(explicit.trainer.log_dir).resolve() == runs / "version_0"
    assert explicit.trainer.global_step == 8
    older = next((runs / "version_1" / "checkpoints").glob("epoch000-*.ckpt"))
    branch = run_cli("fit", *two_epochs, f"--ckpt_path={older}")
    assert Path(branch.trainer.log_dir).resolve() == runs / "version_2"
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1", "version_2"]

    with pytest.raises(SystemExit) as exit_info:  # nothing to resume: an error, not a new run
        run_cli("fit", *one_epoch, "--trainer.logger.init_args.name=other", "--ckpt_path=last")
    assert exit_info.value.code == 2
    assert (
        "error: --ckpt_path last: no last.ckpt under logs/other/*/checkpoints"
        in capsys.readouterr().err
    )
    assert not (in_tmp / "logs" / "other").exists()


@pytest.mark.slow
def test_ddp_two_cpu_processes_sync_metrics_and_checkpoint_loads(in_tmp):
    ddp = [
        "--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "trainer/ddp_cpu.yaml"),
        "--data.init_args.train_size=64", "--data.init_args.val_size=40",
        "--data.init_args.batch_size=8", "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1",
        "--data.init_args.num_workers=0", "--throughput.window_size=2",
    ]  # fmt: skip
    # With the progress bar, as users run it: only rank 0 has one, and it reads the epoch's
    # metrics (a collective) at a point the other rank reaches in another callback.
    done = fit_subprocess(*ddp, cwd=in_tmp, quiet=False)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = in_tmp / "logs" / "demo" / "version_0"
    last = run_dir / "checkpoints" / "last.ckpt"
    # 64 images over 2 ranks x 8 per batch: 4 steps per epoch, not 8.
    assert step_of(last) == 8
    logged = scalars(run_dir, "val/acc1")[-1][1]

    single = run_cli("validate", *ddp[:2], "--data.init_args.val_size=40",
                     "--data.init_args.batch_size=8", f"--ckpt_path={last}")  # fmt: skip
    whole = float(single.trainer.callback_metrics["val/acc1"])
    # What each rank saw alone (DistributedSampler: every other image).
    model, data = single.model.eval(), single.datamodule
    with torch.no_grad():
        images = torch.stack([data.val_set[i][0] for i in range(40)])
        targets = torch.tensor([int(data.val_set[i][1]) for i in range(40)])
        correct = (model(images).argmax(1) == targets).float()
    halves = [float(correct[r::2].mean()) for r in (0, 1)]
    assert whole == pytest.approx(float(correct.mean()), abs=1e-6)
    assert halves[0] != halves[1], f"the test needs ranks that disagree: {halves}"
    assert logged == pytest.approx(whole, abs=1e-6), (logged, whole, halves)
