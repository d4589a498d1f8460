"""Specs with grids and their validation, the local parallel launcher (threads, GPU slots,
report equal to the sequential one's, Ctrl-C), status and report, --retry_failed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from swin_lightning.ablate import main, run_ablation
from swin_lightning.runs.launchers import LocalLauncher
from swin_lightning.runs.spec import AblationSpec
from swin_lightning.runs.store import Experiment, Run, read_status
from tests.conftest import CONFIGS, REPO
from tests.test_ablation import BASE, TINY

ABL = CONFIGS / "ablations"


def write(folder: Path, raw: dict, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------------------- specs
def test_grid_expands_to_named_product_beside_listed_variants(tmp_path):
    spec = AblationSpec.load(write(tmp_path, {
        "experiment": "g", "seeds": [0, 1],
        "variants": {"baseline": [str(ABL / "shift.yaml")]},
        "grid": {"model.net.window_size": [4, 8], "model.net.shift": [True, False],
                 "pos": [str(ABL / "pos_rel.yaml"), str(ABL / "pos_none.yaml")]},
    }))  # fmt: skip
    names = list(spec.variants)
    assert names[0] == "baseline" and len(names) == 1 + 2 * 2 * 2
    assert "window_size=4,shift=true,pos_rel" in names
    assert spec.variants["window_size=8,shift=false,pos_none"] == [
        "model.net.window_size=8", "model.net.shift=false", str(ABL / "pos_none.yaml"),
    ]  # fmt: skip
    assert spec.reference == "baseline"


def test_table4_spec_is_shift_times_position_encoding():
    spec = AblationSpec.load(ABL / "specs" / "table4.yaml")
    shifts = {name.split(",")[0] for name in spec.variants}
    positions = {name.split(",")[1] for name in spec.variants}
    assert shifts == {"shift=true", "shift=false"}
    assert positions == {"pos_none", "pos_abs", "pos_rel", "pos_abs_rel"}
    assert spec.reference == "shift=true,pos_rel" and len(spec.seeds) >= 3


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"experiment": "x", "varients": {"a": []}}, "varients"),
        ({"experiment": "x", "variants": {"a": []}, "seeds": ["one"]}, '"seeds"'),
        ({"experiment": "x", "variants": {"a": []}, "launcher": {"name": "pbs"}}, "launcher.name"),
        ({"experiment": "x", "variants": {"a": []}, "launcher": {"slurm": {"gpus": 1}}},
         "launcher.slurm.gpus"),
        ({"experiment": "x"}, "no variants"),
        ({"experiment": "x", "variants": {"a": []}, "reference": "b"}, "reference 'b'"),
        ({"experiment": "x", "grid": {"model.net.shift": [True, True]}}, "repeats a value"),
        ({"experiment": "x", "grid": {"m": [1, "a.yaml"]}}, "mixes overlay files"),
        ({"experiment": "x", "grid": {"model.net.shift": []}}, "has no values"),
        ({"experiment": "x", "variants": {"a": ["lr"]}}, "neither an overlay"),
        ({"experiment": "x", "variants": {"a": ["missing.yaml"]}}, "overlay missing.yaml not found"),
    ],
)  # fmt: skip
def test_spec_errors_name_the_file_and_key(tmp_path, raw, expected):
    path = write(tmp_path, raw)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        AblationSpec.load(path)
    assert str(path) in str(err.value) and expected in str(err.value), str(err.value)


def test_bad_spec_is_one_error_line(tmp_path, capsys):
    path = write(tmp_path, {"experiment": "x", "variants": {"a": []}, "seeds": "zero"})
    assert main(["--config", BASE, str(path), "--log_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and err.count("\n") == 1


# ---------------------------------------------------------------------------- slots
def gpu_runs() -> list[Run]:
    return [Run("a", 0, "f", Path("/tmp/x"), accelerator="gpu")]


def test_gpu_slots_never_share_a_gpu_unless_asked(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert [s["CUDA_VISIBLE_DEVICES"] for s in LocalLauncher(2, 2).slots(gpu_runs())] == [
        "0,1", "2,3"
    ]  # fmt: skip
    assert [s["CUDA_VISIBLE_DEVICES"] for s in LocalLauncher(4).slots(gpu_runs())] == [
        "0", "1", "2", "3"
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"needs 6 GPUs, 4 visible .*--share_gpus"):
        LocalLauncher(3, 2).slots(gpu_runs())
    shared = LocalLauncher(3, 2, share_gpus=True).slots(gpu_runs())
    assert [s["CUDA_VISIBLE_DEVICES"] for s in shared] == ["0,1", "2,3", "0,1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ValueError, match="no GPU is visible"):
        LocalLauncher(2, 1).slots(gpu_runs())


def test_cpu_slots_split_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    cpu = [Run("a", 0, "f", Path("/tmp/x"), accelerator="cpu")]
    assert [s["OMP_NUM_THREADS"] for s in LocalLauncher(4).slots(cpu)] == ["2"] * 4
    assert [s["OMP_NUM_THREADS"] for s in LocalLauncher(16).slots(cpu)] == ["1"] * 16
    assert LocalLauncher(1).slots(cpu) == [{}]  # one run: torch's own default
    with pytest.raises(ValueError, match="--parallel 0 must be >= 1"):
        LocalLauncher(0)


# ---------------------------------------------------------------------------- parallel runs
def test_status_and_report_of_an_unfinished_experiment(tmp_path, capsys):
    spec = write(tmp_path, {"experiment": "half", "seeds": [0, 1],
                            "variants": {"shift": [str(ABL / "shift.yaml")]}})  # fmt: skip
    run_ablation([BASE], str(spec), str(tmp_path), TINY, seeds=[0])
    # Launch planning for seed 1 without running it: the manifest lists both seeds.
    exp_dir = tmp_path / "half"
    experiment = Experiment.load(exp_dir)
    (run0,) = experiment.runs
    experiment.runs.append(Run("shift", 1, run0.fingerprint, run0.dir.parent / "seed_1",
                               run0.args, run0.items, run0.accelerator))  # fmt: skip
    experiment.save()
    assert main(["status", "half", "--log_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 runs: 1 pending, 1 finished" in out
    assert main(["report", str(exp_dir)]) == 0
    report = (exp_dir / "report.md").read_text()
    assert "| shift | 1 |" in report and "- shift seed 1: pending" in report
    assert main(["status", str(tmp_path / "nowhere")]) == 2
    assert "not an experiment folder" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_stops_every_parallel_run_which_saves_and_resumes(tmp_path):
    spec = write(tmp_path, {"experiment": "cc", "seeds": [0], "variants": {
        "shift": [str(ABL / "shift.yaml")], "no_shift": [str(ABL / "no_shift.yaml")]}})  # fmt: skip
    longer = [a for a in TINY if "max_epochs" not in a]
    longer += ["trainer.max_epochs=8", "step_checkpoint.every_n_train_steps=1"]
    cmd = [sys.executable, "-m", "swin_lightning", "ablate", "--config", BASE, str(spec),
           "--log_dir", str(tmp_path), *longer, "--parallel", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    exp_dir = tmp_path / "cc"
    deadline = time.time() + 240
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        lasts = list(exp_dir.glob("*/*/seed_0/checkpoints/last.ckpt"))
        if len(lasts) == 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Ctrl+C reaches ablate (its runs are in own sessions)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "stopped by SIGINT" in err and "run the same command again" in err
    runs = Experiment.load(exp_dir).runs
    for run in runs:
        assert "SIGINT (Ctrl+C): saved" in (run.dir / "fit.log").read_text()
        assert read_status(run).state == "interrupted"
    assert main(cmd[4:]) == 0
    for run in runs:
        assert json.loads((run.dir / "finished.json").read_text())["resumed"] is True


def test_flags_override_the_spec_launcher_and_reach_sbatch(tmp_path):
    from swin_lightning.ablate import build_parser
    from swin_lightning.runs.launchers import SlurmLauncher, launcher_settings

    spec = write(tmp_path, {
        "experiment": "x", "variants": {"a": []},
        "launcher": {"name": "slurm", "parallel": 3, "slurm": {
            "partition": "gpu", "time_min": 30, "gpus_per_node": 4, "nodes": 2,
            "additional_parameters": {"mail-type": "END"}, "setup": ["module load cuda"]}},
    })  # fmt: skip
    args = build_parser().parse_intermixed_args([
        "--config", BASE, str(spec), "--time_min", "240", "--account", "proj", "--qos", "high",
        "--array_parallelism", "8", "--sbatch", "exclusive=true", "--mem_gb", "64",
    ])  # fmt: skip
    settings = launcher_settings(args, AblationSpec.load(spec).launcher)
    assert settings.name == "slurm" and settings.parallel == 3
    s = settings.slurm
    assert (s.partition, s.time_min, s.account, s.gpus_per_node) == ("gpu", 240, "proj", 4)
    assert s.additional_parameters == {"mail-type": "END", "exclusive": True}
    launcher = SlurmLauncher(s, tmp_path / ".submitit")
    assert launcher.run_args() == ["--trainer.devices=4", "--trainer.num_nodes=2"]
    script = launcher.executor()._make_submission_file_text("python -m x", "uid")
    for line in ("--partition=gpu", "--time=240", "--nodes=2", "--ntasks-per-node=4",
                 "--gpus-per-node=4", "--account=proj", "--qos=high", "--mem=64GB",
                 "--signal=USR2@120", "--mail-type=END", "module load cuda"):  # fmt: skip
        assert line in script, (line, script)


def test_launcher_flags_take_the_types_of_their_settings():
    # The flags are built from the SlurmSettings dataclass: each parses to its field's type
    # (before: by the first word of the annotation, so a bool field came out as the str
    # 'False', which is true).
    import argparse

    from swin_lightning.runs.launchers import add_launcher_flags, flag_type

    parser = argparse.ArgumentParser()
    add_launcher_flags(parser)
    args = parser.parse_args(["--time_min", "30", "--mem_gb", "8.5", "--partition", "gpu",
                              "--array_parallelism", "4"])  # fmt: skip
    assert (args.time_min, args.mem_gb, args.partition, args.array_parallelism) == (
        30, 8.5, "gpu", 4)  # fmt: skip
    assert type(args.time_min) is int and type(args.mem_gb) is float
    assert flag_type(bool)("false") is False and flag_type(bool | None)("yes") is True
    assert flag_type(int | None)("3") == 3 and flag_type(str | None)("a") == "a"
    with pytest.raises(argparse.ArgumentTypeError, match="not a boolean"):
        flag_type(bool)("maybe")
