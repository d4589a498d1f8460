"""`tune`: an Optuna search over fit runs: parallel workers on one SQLite storage, pruning,
kill and resume, the best-trial overlay, status and report, spec validation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from swin_lightning.cli import resolved_settings
from swin_lightning.runs.search import SearchSpec
from swin_lightning.tune import main
from tests.conftest import CONFIGS, REPO

DEMO = str(CONFIGS / "demo.yaml")
SMALL = ["data.init_args.train_size=512", "data.init_args.val_size=128",
         "data.init_args.batch_size=64", "trainer.max_epochs=3",
         "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1"]  # fmt: skip


def write_spec(folder: Path, **raw) -> Path:
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def trials(study_dir: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    url = f"sqlite:///{study_dir / 'study.db'}"
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


@pytest.fixture(scope="module")
def grid_search(tmp_path_factory):
    """4 trials (a grid: a learning rate that learns and one that cannot, x 2 windows), 2
    workers. Seed 5 queues the two that learn first: they complete, and the median pruner
    (2 start-up trials) then judges the other two."""
    folder = tmp_path_factory.mktemp("tune")
    spec = write_spec(folder, study="grid", n_trials=6, sampler="grid", pruner="median", seed=5,
                      space={"model.optimizer.init_args.lr": {"type": "categorical",
                                                              "choices": [0.002, 0.8]},
                             "model.net.window_size": {"type": "categorical",
                                                       "choices": [4, 8]}})  # fmt: skip
    code = main(["--config", DEMO, str(spec), "--log_dir", str(folder), *SMALL, "--parallel", "2"])
    assert code == 0
    return folder / "grid"


@pytest.mark.slow
def test_parallel_search_runs_each_trial_once_and_prunes(grid_search):
    done = trials(grid_search, "grid")
    assert sorted(t.number for t in done) == list(range(4))  # n_trials=6: the grid has 4
    assert len({tuple(sorted(t.params.items())) for t in done}) == 4  # every grid point once
    states = {t.number: t.state for t in done}
    assert all(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
               for s in states.values())  # fmt: skip
    pruned = [t for t in done if t.state == optuna.trial.TrialState.PRUNED]
    lr = "model.optimizer.init_args.lr"
    assert any(t.params[lr] == 0.8 for t in pruned)  # a rate that cannot learn is stopped
    assert all(t.intermediate_values and min(t.intermediate_values) >= 1 for t in pruned) or all(
        1 in t.intermediate_values for t in pruned
    )  # never on the warm-up epoch's noise
    assert max(done, key=lambda t: t.value or 0).params[lr] != 0.8
    for t in done:
        run = grid_search / f"trial_{t.number}"
        assert (run / "finished.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
        assert (run / "pruned.json").is_file() == (t in pruned)
        assert json.loads((run / "run.json").read_text())["attempts"] == 1
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert (
            config["model"]["optimizer"]["init_args"]["lr"]
            == t.params["model.optimizer.init_args.lr"]
        )
    report = (grid_search / "report.md").read_text()
    assert "| pruned |" in report and "4 trials of 4" in report
    assert (grid_search / "history.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_best_overlay_reproduces_the_trials_settings(grid_search, capsys):
    best = max((t for t in trials(grid_search, "grid") if t.value is not None),
               key=lambda t: t.value)  # fmt: skip
    expected = yaml.safe_load((grid_search / f"trial_{best.number}" / "settings.yaml").read_text())
    again = resolved_settings(["--config", DEMO, "--config", str(grid_search / "best.yaml")])
    assert again == expected
    assert main(["status", str(grid_search)]) == 0
    out = capsys.readouterr().out
    assert "4 of 4 trials" in out and "pruned" in out


@pytest.mark.slow
def test_killed_tune_continues_the_study_without_repeating_a_trial(tmp_path):
    spec = write_spec(tmp_path, study="kill", n_trials=2, sampler="random", pruner="none",
                      space={"model.optimizer.init_args.lr": {"type": "float", "low": 1e-3,
                                                              "high": 3e-3, "log": True}})  # fmt: skip
    args = ["--config", DEMO, str(spec), "--log_dir", str(tmp_path), *SMALL,
            "step_checkpoint.every_n_train_steps=1"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "swin_lightning", "tune", *args], text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    study_dir = tmp_path / "kill"
    deadline = time.time() + 300
    while not (study_dir / "trial_1" / "checkpoints" / "last.ckpt").is_file():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "run the same command again" in err
    before = {t.number: t.state.name for t in trials(study_dir, "kill")}
    assert before == {0: "COMPLETE", 1: "RUNNING"}
    assert main([*args, "--n_trials", "3"]) == 0
    after = trials(study_dir, "kill")
    assert sorted(t.number for t in after) == [0, 1, 2]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in after)
    # Trial 2 is this process's first draw: the sampler continues the study's sequence (before,
    # every process seeded it alike and drew trial 0's rate again).
    assert len({t.params["model.optimizer.init_args.lr"] for t in after}) == 3
    resumed = json.loads((study_dir / "trial_1" / "finished.json").read_text())
    assert resumed["resumed"] is True  # trial 1 went on from its last.ckpt, same number
    assert json.loads((study_dir / "trial_0" / "run.json").read_text())["attempts"] == 1


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"study": "x"}, "'space' is empty"),
        ({"study": "x", "space": {"a": {"type": "float", "low": 1, "high": 0}}}, "space.a"),
        ({"study": "x", "space": {"a": {"type": "real"}}}, "Got value: real"),
        ({"study": "x", "sampler": "bayes", "space": {"a": {"type": "int", "low": 1, "high": 2}}},
         '"sampler"'),
        ({"study": "x", "space": {"a": {"type": "categorical"}}}, "needs 'choices'"),
        ({"study": "x", "sampler": "grid", "space": {"a": {"type": "float", "low": 0, "high": 1}}},
         "grid sampler needs categorical"),
        ({"study": "x", "space": {"a": {"type": "float", "low": 0, "high": 1, "log": True}}},
         "log=true needs low > 0"),
        ({"study": "x", "n_trial": 3, "space": {"a": {"type": "int", "low": 1, "high": 2}}},
         "n_trial"),
    ],
)  # fmt: skip
def test_search_spec_errors_name_the_file_and_key(tmp_path, raw, expected):
    path = write_spec(tmp_path, **raw)
    with pytest.raises(ValueError) as err:
        SearchSpec.load(path)
    assert str(path) in str(err.value) and expected in str(err.value), str(err.value)


def test_ready_search_specs_parse(monkeypatch):
    monkeypatch.chdir(REPO)
    for path in sorted((CONFIGS / "search").glob("*.yaml")):
        spec = SearchSpec.load(path)
        assert spec.space and spec.metric == "val/acc1" and spec.direction == "maximize"


def test_status_of_a_folder_that_is_no_study(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "not a study folder" in capsys.readouterr().err


def test_journal_storage_for_cluster_file_systems(tmp_path):
    from swin_lightning.tune import create_study, open_storage, storage_url

    spec = SearchSpec.load(write_spec(tmp_path, study="j", storage="journal", space={
        "model.net.window_size": {"type": "categorical", "choices": [4, 8]}}))  # fmt: skip
    url = storage_url(spec, tmp_path / "j")
    assert url == f"journal:{(tmp_path / 'j' / 'journal.log').resolve()}"
    (tmp_path / "j").mkdir()
    study = create_study(spec, url)
    trial = study.ask()
    trial.suggest_categorical("model.net.window_size", [4, 8])
    study.tell(trial.number, 0.5)
    # Another process (here: another storage object on the same file) sees the trial.
    again = optuna.load_study(study_name="j", storage=open_storage(url))
    assert [t.value for t in again.get_trials()] == [0.5]
    assert (tmp_path / "j" / "journal.log").stat().st_size > 0


def test_a_tune_job_stopped_for_a_requeue_kills_a_trial_that_does_not_save(monkeypatch):
    # submitit's checkpoint (USR2): SIGTERM, then SIGKILL after the grace period, as for
    # ablate's RunJob (before: a trial that ignored SIGTERM was left running).
    from types import SimpleNamespace

    submitit = pytest.importorskip("submitit", reason="the slurm extra is in dev")
    from swin_lightning import tune
    from swin_lightning.runs.attempt import Attempt

    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(120)"  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout.readline().strip() == "up"
    monkeypatch.setattr(tune, "STOP_GRACE_S", 0.5)
    job = tune.TuneJob("search.yaml", 1, [], Path("."), "sqlite://", 0)
    job.worker = SimpleNamespace(current=Attempt(None, process, False, None, time.time()))
    started = time.monotonic()
    again = job.checkpoint()
    assert process.wait(timeout=10) == -signal.SIGKILL
    assert time.monotonic() - started < 10
    assert isinstance(again, submitit.helpers.DelayedSubmission)
