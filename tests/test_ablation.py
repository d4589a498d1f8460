"""The ablation runner: runs, skip/resume/failure handling, report, HParams, notebooks."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import statistics
from pathlib import Path

import nbformat
import pytest
import yaml
from nbclient import NotebookClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from swin_lightning.ablate import AblationSpec, main, run_ablation
from swin_lightning.report import read_run
from swin_lightning.runs.spec import LauncherSettings
from swin_lightning.runs.store import Experiment, read_status
from tests.conftest import CONFIGS, REPO

BASE = str(CONFIGS / "ablations" / "window_pairs.yaml")
TINY = [
    "trainer.max_epochs=2", "data.init_args.train_size=96", "data.init_args.val_size=32",
    "data.init_args.batch_size=32", "trainer.log_every_n_steps=1", "throughput.window_size=2",
    "attention_images.every_n_epochs=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A 2-variant x 2-seed shift ablation with tiny budgets."""
    logs = tmp_path_factory.mktemp("ablation")
    spec = str(CONFIGS / "ablations" / "specs" / "shift.yaml")
    exp_dir, outcomes = run_ablation([BASE], spec, str(logs), TINY, seeds=[0, 1])
    return exp_dir, outcomes


def val_acc1(run_dir) -> list[float]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [e.value for e in acc.Scalars("val/acc1")]


def test_runs_are_laid_out_per_variant_and_seed(experiment):
    exp_dir, outcomes = experiment
    assert sorted((o.variant, o.seed, o.status) for o in outcomes) == [
        ("no_shift", 0, "done"), ("no_shift", 1, "done"), ("shift", 0, "done"), ("shift", 1, "done"),
    ]  # fmt: skip
    for o in outcomes:  # <experiment>/<variant>/<settings fingerprint>/seed_<n>
        assert o.run_dir.parent.parent == exp_dir / o.variant
        assert o.run_dir.name == f"seed_{o.seed}"
    settings = {o.variant: o.run_dir.parent.name for o in outcomes}
    assert len(set(settings.values())) == 2  # one per variant, shared by its seeds
    for variant in ("shift", "no_shift"):
        for seed in (0, 1):
            run = exp_dir / variant / settings[variant] / f"seed_{seed}"
            assert (run / "finished.json").is_file() and (
                run / "checkpoints" / "last.ckpt"
            ).is_file()
            assert len(val_acc1(run)) == 2
            config = yaml.safe_load((run / "config.yaml").read_text())
            assert config["model"]["net"]["init_args"]["shift"] is (variant == "shift")
            assert config["seed_everything"] == seed


def test_report_matches_event_files(experiment):
    exp_dir, _ = experiment
    with open(exp_dir / "report.csv", newline="") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"shift", "no_shift"}
    for variant, row in rows.items():
        curves = [val_acc1(next(exp_dir.glob(f"{variant}/*/seed_{s}"))) for s in (0, 1)]
        best = [max(c) for c in curves]
        final = [c[-1] for c in curves]
        assert float(row["best_val_acc1_mean"]) == pytest.approx(statistics.fmean(best))
        assert float(row["best_val_acc1_std"]) == pytest.approx(statistics.stdev(best))
        assert float(row["final_val_acc1_mean"]) == pytest.approx(statistics.fmean(final))
        assert float(row["params"]) > 0 and float(row["gmacs"]) > 0
        assert float(row["train_samples_per_sec"]) > 0
    assert float(rows["shift"]["delta_best_vs_reference"]) == 0.0
    expected = float(rows["no_shift"]["best_val_acc1_mean"]) - float(
        rows["shift"]["best_val_acc1_mean"]
    )
    assert float(rows["no_shift"]["delta_best_vs_reference"]) == pytest.approx(expected)
    report = (exp_dir / "report.md").read_text()
    assert "| shift | 2 |" in report and "| no_shift | 2 |" in report
    assert (exp_dir / "val_acc1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hparams_and_images_in_tensorboard(experiment):
    exp_dir, _ = experiment
    acc = EventAccumulator(str(next(exp_dir.glob("no_shift/*/seed_1"))))
    acc.Reload()
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    assert {"hp/best_val_acc1", "hp/final_val_acc1"} <= set(acc.Tags()["scalars"])
    assert {"windows/partition_and_shift", "windows/attention_mask", "attention/maps"} <= set(
        acc.Tags()["images"]
    )


def test_rerun_skips_finished_runs(experiment):
    exp_dir, _ = experiment
    runs_events = "*/*/seed_*/events.out.tfevents.*"  # (report/ is the report's, rewritten)
    before = sorted(p.stat().st_mtime_ns for p in exp_dir.glob(runs_events))
    spec = str(CONFIGS / "ablations" / "specs" / "shift.yaml")
    _, outcomes = run_ablation([BASE], spec, str(exp_dir.parent), TINY, seeds=[0, 1])
    assert {o.status for o in outcomes} == {"skipped"}
    after = sorted(p.stat().st_mtime_ns for p in exp_dir.glob(runs_events))
    assert len(before) >= 4 and before == after  # (each run has one or more)


def test_interrupted_run_resumes_and_only_retry_failed_reruns_a_failed_one(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "experiment": "mixed", "reference": "ok", "seeds": [0],
        "variants": {"ok": [str(CONFIGS / "ablations" / "shift.yaml")],
                     "broken": ["model.net.window_size=0"]},
    }))  # fmt: skip
    args = ["--config", BASE, str(spec), "--log_dir", str(tmp_path), *TINY]
    assert main(args) == 1  # the broken variant failed
    exp_dir = tmp_path / "mixed"
    runs = {r.variant: r for r in Experiment.load(exp_dir).runs}
    assert read_status(runs["broken"]).state == "failed"
    assert not (runs["broken"].dir / "finished.json").exists()
    assert "window_size=0 must be >= 1" in (runs["broken"].dir / "fit.log").read_text()
    # As if killed after its last save: last.ckpt but no finished.json (a real kill and
    # resume: test_reliability.py). A plain re-run resumes it, leaves the failed run alone
    # and says how to retry it.
    (runs["ok"].dir / "finished.json").unlink()
    capsys.readouterr()
    assert main(args) == 1
    out = capsys.readouterr().out
    assert json.loads((runs["ok"].dir / "finished.json").read_text())["resumed"] is True
    assert len(val_acc1(runs["ok"].dir)) == 2
    assert "broken seed 0: failed: failed earlier" in out and "--retry_failed" in out
    assert runs["broken"].record["attempts"] == 1
    ok_finished = (runs["ok"].dir / "finished.json").stat().st_mtime_ns
    assert main([*args, "--retry_failed"]) == 1  # still broken, but it ran again
    assert runs["broken"].record["attempts"] == 2
    assert (runs["ok"].dir / "finished.json").stat().st_mtime_ns == ok_finished
    assert main(["report", str(exp_dir)]) == 0
    report = (exp_dir / "report.md").read_text()
    assert "| ok | 1 |" in report and "**broken failed** for seed(s) 0" in report


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r["variant"]: r for r in csv.DictReader(f)}


def test_parallel_runs_equal_sequential_and_threads_are_split(experiment, tmp_path, capsys):
    """`--parallel 2` on this machine: both runs at once, one thread each (2 cores). Seed 0
    of each variant: each run equals its twin from the fixture, run one after another."""
    seq_dir, _ = experiment
    spec = str(CONFIGS / "ablations" / "specs" / "shift.yaml")
    launcher = LauncherSettings(parallel=2)
    exp_dir, outcomes = run_ablation([BASE], spec, str(tmp_path), TINY, [0], launcher)
    assert sorted(o.status for o in outcomes) == ["done"] * 2
    assert main(["status", str(exp_dir)]) == 0
    assert "2 runs: 2 finished" in capsys.readouterr().out
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    for o in outcomes:
        log = (o.run_dir / "fit.log").read_text()
        assert f"launcher: local, torch threads: {threads}," in log
        assert json.loads((o.run_dir / "run.json").read_text())["slot_env"] == {
            "OMP_NUM_THREADS": threads
        }
    parallel = read_csv(exp_dir / "report.csv")
    assert parallel.keys() == {"shift", "no_shift"}
    for o in outcomes:
        twin = seq_dir / o.run_dir.relative_to(exp_dir)  # same variant, settings and seed
        mine, theirs = read_run(o.run_dir, o.variant, "0"), read_run(twin, o.variant, "0")
        assert mine.val_acc1 == theirs.val_acc1
        assert (mine.params, mine.gmacs) == (theirs.params, theirs.gmacs)
        assert mine.val_loss == pytest.approx(theirs.val_loss, abs=1e-4)
        row = parallel[o.variant]
        assert float(row["best_val_acc1_mean"]) == pytest.approx(max(theirs.val_acc1))
        assert float(row["final_val_acc1_mean"]) == pytest.approx(theirs.val_acc1[-1])
        assert row["seeds"] == "0"  # the seeds it aggregates
    # Runs overlapped: each started before the other ended.
    spans = sorted(
        (r["started"], r["ended"])
        for r in (json.loads((o.run_dir / "run.json").read_text()) for o in outcomes)
    )
    assert spans[1][0] < spans[0][1]


@pytest.mark.parametrize(
    "spec", sorted((CONFIGS / "ablations" / "specs").glob("*.yaml")), ids=lambda p: p.stem
)
def test_ready_specs_parse(spec, monkeypatch):
    monkeypatch.chdir(REPO)
    parsed = AblationSpec.load(spec)
    assert len(parsed.variants) >= 2 and len(parsed.seeds) >= 3
    assert parsed.reference in parsed.variants


NOTEBOOKS = REPO / "notebooks"


@pytest.mark.parametrize("name", ["01_shifted_windows.ipynb", "02_ablation_report.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["01_shifted_windows.ipynb", "02_ablation_report.ipynb"])
def test_notebooks_execute(name, experiment, tmp_path, monkeypatch):
    exp_dir, _ = experiment
    monkeypatch.setenv("SWIN_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("SWIN_ABLATION_DIR", str(exp_dir))
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO)}}).execute()  # fmt: skip
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    if name.startswith("01"):
        assert (
            "stage 4: (7, 7, 768)" in text and "masked pairs per window: [0, 128, 128, 192]" in text
        )
    else:
        assert "no_shift: final val top-1" in text and "pp against shift (paired t-test" in text
        assert "shift: final val top-1" in text and "[95% CI" in text
    # Every cell that draws a figure shows it as an image, not as '<Figure ...>' text.
    figure_cells = [c for c in book.cells
                    if c.cell_type == "code" and re.search(r"\bplot_\w+\(|\bplt\.\w+\(", c.source)]  # fmt: skip
    assert figure_cells
    for cell in figure_cells:
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source[:80]
    shutil.rmtree(tmp_path, ignore_errors=True)
