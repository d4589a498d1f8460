"""Hostile use: unwritable folders, full disks, damaged files, kills, re-runs, misuse.

Each test goes through what a user runs (the CLI in-process, or ``python -m swin_lightning``
in a subprocess when signals or exit codes are the point) and checks what they would see:
one ``error:`` line naming the file or setting, a non-zero exit, nothing lost, nothing stale.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from swin_lightning import storage
from swin_lightning.storage import RunLock, WriteError, atomic_open, write_text
from tests.conftest import CONFIGS, QUIET, REPO, TINY_DEMO, run_cli
from tests.test_resume import fit_subprocess, step_of

ONE_EPOCH = [*TINY_DEMO, "--trainer.max_epochs=1"]
RUN_DIR = Path("logs/demo/version_0")


def fails(capsys, *args: str, code: int = 2) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args)
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err
    assert "Traceback" not in err and "error: " in err, err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def immutable(folder: Path) -> None:
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i is not possible here: {done.stderr.decode()[:200]}")


# ---------------------------------------------------------------------------- writes
def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    write_text(target, "old")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", full_disk)
    with pytest.raises(WriteError) as err:
        write_text(target, "new")
    assert str(err.value).startswith(f"cannot write {target}: No space left on device [ENOSPC]")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # no temporary file left

    with pytest.raises(ZeroDivisionError), atomic_open(target) as f:
        f.write("half")
        raise ZeroDivisionError  # a crash mid-write: the old file stays
    assert target.read_text() == "old"


def test_unwritable_checkpoint_folder_is_an_error_not_exit_0(in_tmp):
    first = fit_subprocess(*ONE_EPOCH, cwd=in_tmp)
    assert first.returncode == 0, first.stderr[-2000:]
    checkpoints = in_tmp / RUN_DIR / "checkpoints"
    before = snapshot(checkpoints)
    immutable(checkpoints)
    try:
        resumed = fit_subprocess(*TINY_DEMO, "--trainer.max_epochs=2", "--ckpt_path=last",
                                 cwd=in_tmp)  # fmt: skip
    finally:
        subprocess.run(["chattr", "-i", str(checkpoints)], check=True)
    assert resumed.returncode == 1, resumed.stderr[-2000:]
    assert f"error: cannot write {RUN_DIR / 'checkpoints'}: cannot create files there" in (
        resumed.stderr
    )
    assert "Traceback" not in resumed.stderr
    assert snapshot(checkpoints) == before


def test_full_disk_is_refused_before_the_first_batch(in_tmp, tiny_fs, capsys):
    disk = tiny_fs(2)
    err = fails(capsys, "fit", *ONE_EPOCH, f"--trainer.logger.init_args.save_dir={disk}", code=1)
    assert f"cannot write {disk}/demo/version_0/checkpoints: not enough free space for two " in err
    assert "MiB needed" in err and "MiB free" in err
    assert not list(disk.rglob("*.ckpt"))


def test_disk_full_mid_save_keeps_the_previous_last_ckpt(in_tmp, tiny_fs):
    # Room for the preflight's two checkpoints, not for a third file while last.ckpt is
    # replaced: the epoch-1 save fails, the epoch-0 last.ckpt must survive intact.
    disk = tiny_fs(10)
    done = fit_subprocess(*TINY_DEMO, f"--trainer.logger.init_args.save_dir={disk}",
                          "--step_checkpoint.every_n_train_steps=0", cwd=in_tmp)  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    last = disk / "demo" / "version_0" / "checkpoints" / "last.ckpt"
    assert (
        "No space left on device [ENOSPC]" in done.stderr and "error: cannot write" in done.stderr
    )
    assert "Traceback" not in done.stderr
    assert step_of(last) == 4  # epoch 0's, complete
    assert not list(last.parent.glob(".*.tmp"))


def test_checkpoints_do_not_go_through_tmpdir(in_tmp, tiny_fs):
    # Lightning's own save writes to TMPDIR and moves the file: with TMPDIR full (a small
    # local /tmp on a cluster node), checkpoints could not be written at all.
    full = tiny_fs(0.1)
    (full / "filler").write_bytes(b"\0" * 90_000)
    env_tmp = {**os.environ, "TMPDIR": str(full)}
    cmd = [sys.executable, "-m", "swin_lightning", "fit", *ONE_EPOCH, *QUIET]
    done = subprocess.run(cmd, cwd=in_tmp, env={**env_tmp, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert step_of(in_tmp / RUN_DIR / "checkpoints" / "last.ckpt") == 4


# ---------------------------------------------------------------------------- damaged inputs
def test_truncated_last_ckpt_names_the_newest_intact_one(in_tmp, capsys):
    run_cli("fit", *ONE_EPOCH)
    last = in_tmp / RUN_DIR / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:500_000])
    err = fails(capsys, "fit", *TINY_DEMO, "--ckpt_path=last")
    best = next(last.parent.glob("epoch000-*.ckpt"))
    assert (
        f"checkpoint {RUN_DIR / 'checkpoints' / 'last.ckpt'} cannot be used: it is truncated" in err
    )
    assert f"the newest intact checkpoint in that folder is {best.relative_to(in_tmp)}" in err
    assert "weights_only" not in err and len(err.strip().splitlines()) == 1


def test_foreign_checkpoint_is_refused_without_unsafe_advice(in_tmp, capsys):
    foreign = in_tmp / "foreign.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "x": Path("a")}, foreign)  # a class
    err = fails(capsys, "validate", *ONE_EPOCH, f"--ckpt_path={foreign}")
    assert f"checkpoint {foreign} cannot be used: it holds Python objects" in err
    assert "weights_only" not in err
    weights = in_tmp / "weights.ckpt"
    torch.save({"net.head.weight": torch.zeros(1)}, weights)
    err = fails(capsys, "validate", *ONE_EPOCH, f"--ckpt_path={weights}")
    assert "is not a Lightning training checkpoint" in err and "--model.pretrained" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "is empty, not a mapping of settings"),
        ("- 1\n- 2\n", "is a list, not a mapping of settings"),
        ("trainer: [\n", "invalid YAML at line"),
    ],
)
def test_bad_yaml_names_the_file(text, expected, in_tmp, capsys):
    (in_tmp / "bad.yaml").write_text(text)
    err = fails(capsys, "fit", *ONE_EPOCH, "--config", "bad.yaml")
    assert f"error: --config bad.yaml {expected}" in err or f"--config bad.yaml: {expected}" in err
    assert not (in_tmp / "logs").exists()


def test_report_lists_a_damaged_run_and_reports_the_intact_ones(tmp_path):
    from swin_lightning.report import write_report

    exp = tmp_path / "exp"
    source = tmp_path / "source"
    run_cli("fit", *ONE_EPOCH, f"--trainer.logger.init_args.save_dir={source}")
    events = next((source / "demo" / "version_0").glob("events.out.tfevents.*"))
    runs = {}
    for variant in ("a", "b"):
        run = exp / variant / "settings0" / "seed_0"
        run.mkdir(parents=True)
        shutil.copy(events, run / events.name)
        runs[variant] = [run]
    damaged = exp / "b" / "settings0" / "seed_0" / events.name
    data = bytearray(damaged.read_bytes())
    data[200:260] = b"\xff" * 60
    damaged.write_bytes(bytes(data))
    rows = write_report(exp, "a", ["a", "b"], run_dirs=runs)
    assert [r.variant for r in rows] == ["a"]
    report = (exp / "report.md").read_text()
    assert "| a | 1 |" in report and "| b |" not in report
    assert f"**damaged run, not reported:** {damaged.parent}: {damaged}: damaged record" in report


# ---------------------------------------------------------------------------- misuse
@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluating_random_weights_is_refused(subcommand, in_tmp, capsys):
    err = fails(capsys, subcommand, *ONE_EPOCH)
    assert f"{subcommand} needs trained weights" in err
    assert "--ckpt_path" in err and "model.pretrained" in err and "allow_random_weights" in err


def test_random_weights_on_purpose(in_tmp):
    cli = run_cli("validate", *ONE_EPOCH, "--allow_random_weights=true")
    assert "val/acc1" in cli.trainer.callback_metrics


def test_zero_steps_per_epoch_names_the_batch_size(in_tmp, capsys):
    err = fails(capsys, "fit", *ONE_EPOCH, "--data.init_args.batch_size=100")
    assert "data.batch_size=100 is larger than the training set (64 images)" in err
    assert "drop_last" in err and "at most 64" in err
    assert not [p for p in in_tmp.rglob("*") if p.is_file()]  # no run folder left behind


def test_predict_writes_every_good_row_and_lists_the_bad(in_tmp, capsys):
    run_cli("fit", *ONE_EPOCH)
    from swin_lightning.samples import main as samples

    samples(["images", "--count", "5"])
    good = sorted((in_tmp / "images").glob("*.png"))
    (in_tmp / "images" / "broken.png").write_bytes(b"not a png")
    err = fails(capsys, "predict", *ONE_EPOCH, f"--ckpt_path={RUN_DIR / 'checkpoints' / 'last.ckpt'}",
                "--data.predict_dir=images", "--prediction_writer.output=out.csv", code=1)  # fmt: skip
    assert "predict: 1 of 6 images could not be read and have no row in out.csv" in err
    assert "images/broken.png" in err
    rows = (in_tmp / "out.csv").read_text().splitlines()
    assert len(rows) == 1 + len(good) and not any("broken" in r for r in rows)
    listed = (in_tmp / "out.unreadable.csv").read_text()
    assert "images/broken.png" in listed and "UnidentifiedImageError" in listed


# ---------------------------------------------------------------------------- locks
def test_rejected_resume_leaves_the_run_folder_byte_identical(in_tmp, capsys):
    run_cli("fit", *ONE_EPOCH)
    before = snapshot(in_tmp / RUN_DIR)
    err = fails(capsys, "fit", *TINY_DEMO, "--ckpt_path=last", "--model.net.embed_dim=24")
    assert "does not fit the configured model" in err
    assert snapshot(in_tmp / RUN_DIR) == before


def test_fresh_fit_into_a_pinned_folder_with_a_run_is_refused(in_tmp, capsys):
    run_cli("fit", *ONE_EPOCH)
    before = snapshot(in_tmp / RUN_DIR)
    err = fails(capsys, "fit", *ONE_EPOCH, "--trainer.logger.init_args.version=0")
    assert "already holds a run" in err and "--ckpt_path last" in err
    assert snapshot(in_tmp / RUN_DIR) == before


def test_a_locked_run_is_refused_and_a_dead_holder_never_blocks(in_tmp, capsys):
    run_cli("fit", *ONE_EPOCH)
    with RunLock(in_tmp / RUN_DIR):
        err = fails(capsys, "fit", *TINY_DEMO, "--ckpt_path=last")
    assert f"run folder {RUN_DIR} is in use by pid {os.getpid()} on host" in err
    # A holder killed with SIGKILL: the kernel drops its lock.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from swin_lightning.storage import RunLock; "
        f"RunLock({str(in_tmp / RUN_DIR)!r}).acquire(); print('locked', flush=True); "
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    cli = run_cli("fit", *TINY_DEMO, "--ckpt_path=last")
    assert cli.trainer.global_step == 8


def test_new_runs_started_together_get_their_own_folders(in_tmp):
    procs = [subprocess.Popen([sys.executable, "-m", "swin_lightning", "fit", *ONE_EPOCH,
                               "--trainer.max_steps=1", *QUIET], cwd=in_tmp,
                              env={**os.environ, "PYTHONPATH": str(REPO)},
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    assert [p.wait(timeout=300) for p in procs] == [0, 0], [p.stderr.read()[-2000:] for p in procs]
    runs = sorted(p.name for p in (in_tmp / "logs" / "demo").iterdir())
    assert runs == ["version_0", "version_1"]
    assert all((in_tmp / "logs" / "demo" / r / "checkpoints" / "last.ckpt").is_file() for r in runs)


# ---------------------------------------------------------------------------- signals
ABLATE_BASE = str(CONFIGS / "ablations" / "window_pairs.yaml")
ABLATE_TINY = [
    "trainer.max_epochs=2", "data.init_args.train_size=96", "data.init_args.val_size=32",
    "data.init_args.batch_size=32", "trainer.log_every_n_steps=1",
    "attention_images.every_n_epochs=0", "trainer.enable_model_summary=false",
]  # fmt: skip


def one_variant_spec(folder: Path) -> Path:
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "experiment": "exp", "seeds": [0],
        "variants": {"shift": [str(CONFIGS / "ablations" / "shift.yaml")]},
    }))  # fmt: skip
    return spec


def test_ablate_rerun_with_other_settings_never_reports_the_old_runs(tmp_path):
    from swin_lightning.ablate import run_ablation

    spec = one_variant_spec(tmp_path)
    exp, first = run_ablation([ABLATE_BASE], str(spec), str(tmp_path), ABLATE_TINY)
    exp, again = run_ablation([ABLATE_BASE], str(spec), str(tmp_path), ABLATE_TINY)
    assert [o.status for o in first] == ["done"] and [o.status for o in again] == ["skipped"]
    changed = [*ABLATE_TINY, "model.optimizer.init_args.lr=0.5"]
    _, new = run_ablation([ABLATE_BASE], str(spec), str(tmp_path), changed)
    assert [o.status for o in new] == ["done"]
    old_dir, new_dir = first[0].run_dir, new[0].run_dir
    assert old_dir != new_dir and old_dir.parent.parent == new_dir.parent.parent
    assert (old_dir / "finished.json").is_file()  # the old run is kept
    settings = yaml.safe_load((new_dir.parent / "settings.yaml").read_text())
    assert settings["model"]["optimizer"]["init_args"]["lr"] == 0.5
    report = (exp / "report.md").read_text()
    assert f"`{new_dir.parent.name}`" in report and old_dir.parent.name not in report


def test_ablate_refuses_a_run_another_ablate_holds(tmp_path, capsys):
    from swin_lightning.ablate import run_ablation

    spec = one_variant_spec(tmp_path)
    _, first = run_ablation([ABLATE_BASE], str(spec), str(tmp_path), ABLATE_TINY)
    (first[0].run_dir / "finished.json").unlink()
    with RunLock(first[0].run_dir):
        _, outcomes = run_ablation([ABLATE_BASE], str(spec), str(tmp_path), ABLATE_TINY)
    assert [o.status for o in outcomes] == ["busy"]
    assert f"in use by pid {os.getpid()}" in outcomes[0].message


def _ablate_subprocess(tmp_path: Path, spec: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "swin_lightning", "ablate", "--config", ABLATE_BASE, str(spec),
           "--log_dir", str(tmp_path), *[a for a in ABLATE_TINY if "max_epochs" not in a],
           "trainer.max_epochs=6", "step_checkpoint.every_n_train_steps=1"]  # fmt: skip
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _child_pid_once_training(
    run_root: Path, proc: subprocess.Popen, after_step: int = 0
) -> tuple[int, Path]:
    """Wait until the run's fit holds the lock and has saved a checkpoint past
    ``after_step``; the PID the lock names, and the run folder."""
    deadline = time.time() + 240
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        for last in run_root.rglob("last.ckpt"):
            run_dir = last.parent.parent
            text = (run_dir / ".lock").read_text()
            if text.startswith("pid ") and _saved_step(last) > after_step:
                return int(text.split()[1]), run_dir
        time.sleep(0.2)
    raise AssertionError("the run did not start")


def _saved_step(ckpt: Path) -> int:
    """The step of a checkpoint being rewritten beside us (-1 while it cannot be read)."""
    try:
        return step_of(ckpt)
    except Exception:  # replaced between our open and read: read it next time
        return -1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def _stop_ablate_and_its_run(
    proc: subprocess.Popen, run_root: Path, signum: int, after_step: int
) -> tuple[Path, int]:
    """Once its run has saved past ``after_step``, send ``signum`` to ablate; check that the
    run stopped with it and saved on the way out. The run folder and the step it saved."""
    child, run_dir = _child_pid_once_training(run_root, proc, after_step)
    assert child == proc.pid  # the lock file names the ablate parent: it handed the lock down
    # Its run: a process under this ablate (other tests' runs may be training beside it).
    fits = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)
            if "seed_0" in " ".join(p.cmdline())]  # fmt: skip
    assert len(fits) == 1, fits
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    deadline = time.time() + 60
    while _alive(fits[0]) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(fits[0]), "the run outlived ablate"
    if signum == signal.SIGTERM:
        assert proc.returncode == 143, err[-3000:]
        assert "stopped by SIGTERM" in err and "run the same command again" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    # The run saved on its way out, also when ablate itself was killed.
    log = (run_dir / "fit.log").read_text()
    assert log.count("SIGTERM: saved") == (1 if after_step == 0 else 2), log[-3000:]
    assert not (run_dir / "finished.json").exists()
    return run_dir, step_of(run_dir / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_killing_ablate_stops_its_run_which_saves_and_resumes(tmp_path):
    """SIGTERM to ablate, then SIGKILL to the ablate that resumed it (one scenario: each
    signal costs an ablate and a fit start-up), then a third ablate finishes the run."""
    spec = one_variant_spec(tmp_path)
    run_dir, first = _stop_ablate_and_its_run(
        _ablate_subprocess(tmp_path, spec), tmp_path / "exp", signal.SIGTERM, after_step=0
    )
    again, second = _stop_ablate_and_its_run(
        _ablate_subprocess(tmp_path, spec), tmp_path / "exp", signal.SIGKILL, after_step=first
    )
    assert again == run_dir and second > first
    log = (run_dir / "fit.log").read_text()
    assert f"last.ckpt (step {first})" in log  # the second ablate resumed the first's save
    last = _ablate_subprocess(tmp_path, spec)
    out, err = last.communicate(timeout=400)
    assert last.returncode == 0, err[-3000:]
    assert "shift seed 0: resumed" in out
    assert json.loads((run_dir / "finished.json").read_text())["resumed"] is True
    assert step_of(run_dir / "checkpoints" / "last.ckpt") == 18 > second
    assert f"last.ckpt (step {second})" in (run_dir / "fit.log").read_text()
