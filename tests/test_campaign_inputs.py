"""`tune` and `ablate` with wrong specs and damaged state: checked before anything is claimed
or written, one `error:` line each; a study's draws never repeat a tried point, and a trial
folder is never reused for other settings."""

from __future__ import annotations

import optuna
import pytest
import yaml

from swin_lightning import ablate, tune
from swin_lightning.runs.search import SearchSpec
from swin_lightning.runs.spec import AblationSpec
from tests.conftest import CONFIGS

DEMO = str(CONFIGS / "demo.yaml")
LR = "model.optimizer.init_args.lr"


def write_yaml(path, text: str):
    path.write_text(text)
    return path


def search(folder, **raw) -> SearchSpec:
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return SearchSpec.load(path)


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_a_typo_in_the_search_space_is_one_line_before_any_trial(tmp_path, capsys):
    spec = tmp_path / "search.yaml"
    spec.write_text(yaml.safe_dump({"study": "typo", "space": {
        "model.optimizer.init_args.lrr": {"type": "float", "low": 1e-3, "high": 1e-2}}}))  # fmt: skip
    assert tune.main(["--config", DEMO, str(spec), "--log_dir", str(tmp_path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "space.model.optimizer.init_args.lrr" in line and "'lr'" in line, line
    assert "no trial was started" in line
    assert not (tmp_path / "typo").exists()  # no study, no folder: nothing to clean up


def test_a_trial_left_running_outside_the_space_is_failed_and_the_study_goes_on(tmp_path, capsys):
    # What a crashed process left: trial 0 RUNNING with the typo'd key (before this fix, every
    # re-run died with a KeyError from the spec). The fixed spec fails it and asks trial 1.
    spec = search(tmp_path, study="s", n_trials=2, sampler="random",
                  space={LR: {"type": "float", "low": 1e-3, "high": 1e-2}})  # fmt: skip
    study_dir = tmp_path / "s"
    url = tune.storage_url(spec, study_dir)
    study_dir.mkdir()
    stale = tune.create_study(spec, url).ask()
    stale.suggest_float("model.optimizer.init_args.lrr", 1e-3, 1e-2)
    worker = tune.Worker(spec, ["--config", DEMO], study_dir, url, env={})
    number, run, lock = worker.claim()
    lock.release()
    states = {t.number: t.state for t in worker.study.get_trials()}
    assert number == 1 and states == {0: optuna.trial.TrialState.FAIL,
                                      1: optuna.trial.TrialState.RUNNING}  # fmt: skip
    assert "not in the spec's space any more: marked failed" in capsys.readouterr().out
    assert run.dir == study_dir / "trial_1" and (run.dir / "settings.yaml").is_file()


def test_draws_never_repeat_a_tried_point_across_processes(tmp_path, capsys):
    # Each Worker is what a new `tune` process builds. Before, every process seeded its
    # sampler alike, so the second drew the first one's point again.
    spec = search(tmp_path, study="r", n_trials=5, sampler="random", pruner="none",
                  space={"model.net.window_size": {"type": "categorical", "choices": [4, 8]},
                         "model.net.shift": {"type": "categorical", "choices": [True, False]}})  # fmt: skip
    study_dir = tmp_path / "r"
    url = tune.storage_url(spec, study_dir)
    study_dir.mkdir()
    drawn = []
    for _ in range(4):
        worker = tune.Worker(spec, ["--config", DEMO], study_dir, url, env={})
        trial = worker.ask()
        drawn.append(tuple(sorted(trial.params.items())))
        worker.study.tell(trial, 0.5)
    assert len(set(drawn)) == 4  # the 4 points of the space, each once
    assert tune.Worker(spec, ["--config", DEMO], study_dir, url, env={}).ask() is None
    assert "the space has 4 points and every one is tried" in capsys.readouterr().out
    counted = [t for t in optuna.load_study(study_name="r", storage=url).get_trials()
               if not tune.is_repeat(t)]  # fmt: skip
    assert len(counted) == 4  # repeats drawn on the way are closed and not counted


def test_a_trial_folder_is_never_reused_for_other_settings(tmp_path, capsys):
    spec = search(tmp_path, study="f", n_trials=2, sampler="random",
                  space={LR: {"type": "float", "low": 1e-3, "high": 1e-2}})  # fmt: skip
    study_dir = tmp_path / "f"
    url = tune.storage_url(spec, study_dir)
    # A folder left by an earlier study of this name (its storage deleted): moved aside.
    old = study_dir / "trial_0"
    (old / "checkpoints").mkdir(parents=True)
    (old / "finished.json").write_text('{"fingerprint": "x"}')
    worker = tune.Worker(spec, ["--config", DEMO], study_dir, url, env={})
    number, run, lock = worker.claim()
    lock.release()
    assert number == 0 and not (run.dir / "finished.json").exists()
    moved = list((study_dir / ".moved").iterdir())
    assert len(moved) == 1 and (moved[0] / "finished.json").is_file()
    assert "moved it to" in capsys.readouterr().out
    # The trial is interrupted; the re-run comes with another base setting: refused.
    other = tune.Worker(spec, ["--config", DEMO, "--trainer.max_epochs=7"], study_dir, url, env={})
    with pytest.raises(ValueError, match="trial 0 of f was started with other settings"):
        other.claim()
    assert {t.state for t in other.study.get_trials()} == {optuna.trial.TrialState.RUNNING}


def test_a_damaged_study_storage_is_one_line(tmp_path, capsys):
    spec = search(tmp_path, study="d", space={LR: {"type": "float", "low": 1e-3, "high": 1e-2}})
    study_dir = tmp_path / "d"
    study_dir.mkdir()
    url = tune.storage_url(spec, study_dir)
    tune.create_study(spec, url)
    tune.write_manifest(study_dir, spec, url, ["--config", DEMO])
    db = study_dir / "study.db"
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 3])  # truncated
    for argv in (["status", str(study_dir)], ["report", str(study_dir)],
                 ["--config", DEMO, str(tmp_path / "search.yaml"), "--log_dir", str(tmp_path)]):  # fmt: skip
        assert tune.main(argv) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"the study storage {url} cannot be read" in line and "move it away" in line


def test_two_variants_of_one_name_are_refused(tmp_path, capsys):
    spec = write_yaml(tmp_path / "spec.yaml", "experiment: dup\nvariants:\n"
                      "  a: [model.net.init_args.shift=false]\n"
                      "  b: [model.net.init_args.shift=true]\n"
                      "  a: [model.net.init_args.window_size=8]\n")  # fmt: skip
    with pytest.raises(ValueError, match=r"'a' is given twice \(lines 3 and 5\)"):
        AblationSpec.load(spec)
    assert ablate.main(["--config", DEMO, str(spec), "--log_dir", str(tmp_path)]) == 2
    assert "'a' is given twice" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "dup").exists()


def test_variants_that_resolve_to_the_same_settings_are_refused(tmp_path, capsys):
    spec = write_yaml(tmp_path / "spec.yaml",
                      "experiment: same\ngrid:\n  model.optimizer.init_args.weight_decay: [0, 0.0]\n")  # fmt: skip
    assert ablate.main(["--config", DEMO, str(spec), "--log_dir", str(tmp_path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "variants 'weight_decay=0' and 'weight_decay=0.0'" in line
    assert "resolve to the same settings" in line
    assert not (tmp_path / "same").exists()


def test_a_typo_in_one_variant_stops_the_ablation_before_any_run(tmp_path, capsys):
    spec = write_yaml(tmp_path / "spec.yaml", "experiment: typo\nvariants:\n"
                      "  ok: [model.net.init_args.shift=true]\n"
                      "  bad: [model.net.init_args.shfit=false]\n")  # fmt: skip
    assert ablate.main(["--config", DEMO, str(spec), "--log_dir", str(tmp_path)]) == 2
    line = one_error_line(capsys.readouterr().err)  # no Lightning warning in front of it
    assert line.startswith("error: variant 'bad' of typo:"), line
    assert "'shift'" in line and "nothing was run" in line
    assert not (tmp_path / "typo").exists()


def test_repeated_choices_seeds_and_a_zero_budget_are_refused(tmp_path, capsys):
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"study": "c", "space": {
        "model.net.window_size": {"type": "categorical", "choices": [4, 4.0]}}}))  # fmt: skip
    with pytest.raises(ValueError, match=r"choices 4 and 4\.0 are the same value"):
        SearchSpec.load(path)
    path.write_text(yaml.safe_dump({"study": "c", "space": {
        "model.net.window_size": {"type": "categorical", "choices": [4, 8]}}}))  # fmt: skip
    with pytest.raises(SystemExit):
        tune.main(["--config", DEMO, str(path), "--n_trials", "0"])
    assert "--n_trials=0 must be >= 1" in capsys.readouterr().err
    spec = write_yaml(tmp_path / "spec.yaml", "experiment: s\nvariants:\n  a: []\n")
    assert ablate.main(["--config", DEMO, str(spec), "--seeds", "0,0"]) == 2
    assert "--seeds lists a seed twice: [0, 0]" in one_error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit):
        ablate.main(["--config", DEMO, str(spec), "--seeds", "0,x"])
    assert "'0,x' is not a comma-separated list of integers" in capsys.readouterr().err
