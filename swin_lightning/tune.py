"""``python -m swin_lightning tune``: a hyperparameter search with Optuna over ``fit`` runs.

    tune --config BASE.yaml SEARCH.yaml [key=value ...] [--n_trials N] [--parallel N]
    tune status STUDY        # the trials: state, value, epoch reached, parameters
    tune report STUDY        # report.md, best.yaml, history.png, importance.png

Optuna is the engine: the study lives in an Optuna storage that every worker shares (SQLite
in the study folder by default, Optuna's journal file for cluster file systems, or a URL).
A worker asks the study for a trial, trains it as a normal run folder
``logs/<study>/trial_<n>`` (config, logs, checkpoints, run lock, settings fingerprint),
reports val metrics per epoch to the study's pruner (:class:`~swin_lightning.callbacks.
runs.pruning.TrialPruning`), and tells the study the trial's best value. ``--parallel N`` runs N workers
here (each with its GPUs or share of the cores, as ``ablate``); ``--launcher slurm`` runs them
as a SLURM job array. Killing ``tune`` and running it again continues the study: a trial
whose run was interrupted is resumed from its ``last.ckpt`` under its own number, so no
trial is run or counted twice.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from swin_lightning.protocol import SETTINGS
from swin_lightning.runs import attempt
from swin_lightning.runs.campaign import campaign_dir, dispatch, folder_parser, stop_message
from swin_lightning.runs.launchers import (
    STOP_GRACE_S,
    LocalLauncher,
    SignalForwarder,
    add_launcher_flags,
    launcher_settings,
)
from swin_lightning.runs.pruning import TrialEnv, make_pruner, open_storage
from swin_lightning.runs.search import SearchSpec
from swin_lightning.runs.spec import LauncherSettings, cli_args
from swin_lightning.runs.store import Run, fingerprint
from swin_lightning.storage import RunBusyError, RunLock, write_text
from swin_lightning.study_report import MANIFEST, REPEAT, print_status, write_study_report

MAX_REPEATS = 10  # draws of tried points in a row (a continuous space) before giving up


def storage_url(spec: SearchSpec, study_dir: Path) -> str:
    if spec.storage is None:
        return f"sqlite:///{(study_dir / 'study.db').resolve()}"
    if spec.storage == "journal":
        return f"journal:{(study_dir / 'journal.log').resolve()}"
    return spec.storage


def sampler_seed(spec: SearchSpec, number: int) -> int:
    """The sampler's seed for the study's trial ``number``: a function of the study and the
    trial, not of the process, so a re-run or another worker continues the sequence instead
    of drawing the points already drawn."""
    digest = hashlib.sha256(f"{spec.study}:{spec.seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def make_sampler(spec: SearchSpec, seed: int) -> Any:
    import optuna

    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
        # The grid's points are queued in the study (enqueue_grid), so workers never draw the
        # same point; the sampler only serves a trial asked for past the queue.
        "grid": lambda: optuna.samplers.RandomSampler(seed=seed),
    }
    return samplers[spec.sampler]()


def create_study(spec: SearchSpec, url: str) -> Any:
    """The study (created on first use); its sampler is seeded anew before each trial
    (:func:`sampler_seed`)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name=spec.study, storage=open_storage(url), sampler=make_sampler(spec, spec.seed),
        pruner=make_pruner(spec.pruner), direction=spec.direction, load_if_exists=True,
    )  # fmt: skip


def check_space(spec: SearchSpec, base: list[str]) -> None:
    """Every parameter of the space, at each of its choices (or both bounds), resolves
    against the base config: a typo'd key is a ValueError naming the parameter (and the
    closest valid key) before any trial is asked."""
    from swin_lightning.cli import resolved_settings

    for key, p in spec.space.items():
        values = p.choices if p.type == "categorical" else [p.low, p.high]
        for value in values:
            value = int(value) if p.type == "int" else value
            try:
                resolved_settings([*base, *cli_args(spec.items({key: value}))])
            except (ValueError, OSError) as err:
                raise ValueError(f"{spec.study}: space.{key} = {value!r}: {err}; no trial was "
                                 "started: fix the spec and run again") from None  # fmt: skip


def _axis(p: Any) -> Sequence[Any] | None:
    """The values one parameter can take (None: continuous)."""
    if p.type == "categorical":
        return list(p.choices)
    if p.type == "int":
        return range(int(p.low), int(p.high) + 1, int(p.step or 1))
    if p.step:
        return [p.low + i * p.step for i in range(round((p.high - p.low) / p.step) + 1)]
    return None


def space_size(spec: SearchSpec) -> int | None:
    """How many distinct points the space has (None: continuous)."""
    axes = [_axis(p) for p in spec.space.values()]
    return None if any(a is None for a in axes) else math.prod(len(a) for a in axes)


def space_points(spec: SearchSpec) -> list[dict[str, Any]]:
    """Every point of a finite space."""
    axes = [_axis(p) for p in spec.space.values()]
    return [dict(zip(spec.space, values, strict=True)) for values in itertools.product(*axes)]


def in_space(spec: SearchSpec, params: dict[str, Any]) -> bool:
    """Whether a trial's parameters are a point of the spec's space as it is now."""
    if set(params) != set(spec.space):
        return False
    for key, value in params.items():
        p = spec.space[key]
        if p.type == "categorical" and value not in p.choices:
            return False
        if p.type != "categorical" and not p.low <= value <= p.high:
            return False
    return True


def point(params: dict[str, Any]) -> frozenset:
    return frozenset(params.items())


def is_repeat(trial: Any) -> bool:
    """A draw of a point already tried, closed at once: no run, not counted, not reported."""
    return REPEAT in trial.user_attrs


def enqueue_grid(spec: SearchSpec, study: Any, study_dir: Path) -> None:
    """The grid sampler's points, queued once in the study (shuffled by the seed): workers
    take them in turn, so no point is trained twice, however many workers ask at once."""
    import random

    grid = space_points(spec)
    random.Random(spec.seed).shuffle(grid)
    spec.n_trials = min(spec.n_trials, len(grid))
    with study_lock(study_dir):
        if not study.get_trials(deepcopy=False):
            for params in grid[: spec.n_trials]:
                study.enqueue_trial(params)


def study_lock(study_dir: Path) -> Any:
    """One worker at a time counts, asks and claims trials: a ``filelock.FileLock`` on
    ``<study>/.ask.lock`` (blocking; across processes and SLURM tasks on a shared disk)."""
    from filelock import FileLock

    study_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(study_dir / ".ask.lock")


def suggest(trial: Any, spec: SearchSpec) -> dict[str, Any]:
    params = {}
    for key, p in spec.space.items():
        if p.type == "categorical":
            params[key] = trial.suggest_categorical(key, p.choices)
        elif p.type == "int":
            step = int(p.step or 1)
            params[key] = trial.suggest_int(key, int(p.low), int(p.high), step=step, log=p.log)
        else:
            params[key] = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
    return params


def metric_values(run_dir: Path, metric: str) -> list[float]:
    """The values a trial's run logged for the study's metric (any scalar: a SimMIM trial
    logs ``val/loss`` and no ``val/acc1``)."""
    from swin_lightning.events import read_scalars, scalar_values

    return scalar_values(read_scalars(run_dir), metric)


class Worker:
    """Asks the study for trials and trains them until the study has ``n_trials``."""

    def __init__(self, spec: SearchSpec, base: list[str], study_dir: Path, url: str,
                 env: dict[str, str], launcher: str = "local",
                 stop: SignalForwarder | None = None) -> None:  # fmt: skip
        self.spec, self.base, self.study_dir, self.url = spec, base, study_dir, url
        self.env, self.launcher, self.stop = env, launcher, stop
        self.study = create_study(spec, url)
        self.current: attempt.Attempt | None = None
        self.log: list[str] = []

    def run_of(self, number: int, params: dict[str, Any], new: bool) -> Run:
        """Trial ``number``'s run. A new trial's folder that already exists (left by an earlier
        study of this name) is moved aside; a resumed trial's folder must hold the same
        settings, else a ValueError: its old result is never attached to other settings."""
        from swin_lightning.cli import resolved_settings

        items = self.spec.items(params)
        args = [*self.base, *cli_args(items)]
        settings = resolved_settings(args)
        run = Run(f"trial_{number}", self.spec.seed, fingerprint(settings),
                  self.study_dir / f"trial_{number}", args, items)  # fmt: skip
        settings_file = run.dir / SETTINGS
        if new and run.dir.exists():
            moved = self.study_dir / ".moved" / f"{run.dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            moved.parent.mkdir(parents=True, exist_ok=True)
            run.dir.rename(moved)
            print(f"[tune] trial {number}: {run.dir} held a run this study never asked for (an "
                  f"earlier study of the same name?); moved it to {moved}", flush=True)  # fmt: skip
        elif settings_file.is_file():
            try:
                old = fingerprint(yaml.safe_load(settings_file.read_text()) or {})
            except (OSError, yaml.YAMLError):
                old = "unreadable"
            if old != run.fingerprint:
                raise ValueError(
                    f"trial {number} of {self.spec.study} was started with other settings "
                    f"({settings_file}: {old}, now {run.fingerprint}): the base config, the "
                    "overrides or the spec's args changed since; run with the old ones to "
                    "continue the study, or give the spec another study name"
                )
        if not settings_file.is_file():
            write_text(settings_file, yaml.safe_dump(settings, sort_keys=False))
        return run

    def claim(self) -> tuple[int, Run, RunLock] | None:
        """The next trial to train: an interrupted one (its run folder free), else a new one
        while the study has fewer than ``n_trials``; None when there is nothing to do."""
        from optuna.trial import TrialState

        with study_lock(self.study_dir):
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if RunLock(self.study_dir / f"trial_{t.number}").held_by():
                    continue  # another worker trains it: no need to resolve its settings
                if not in_space(self.spec, t.params):
                    self.study.tell(t.number, state=TrialState.FAIL)
                    print(f"[tune] trial {t.number}: its parameters {t.params} are not in the "
                          "spec's space any more: marked failed", flush=True)  # fmt: skip
                    continue
                run = self.run_of(t.number, t.params, new=False)
                try:
                    return t.number, run, RunLock(run.dir).acquire()
                except RunBusyError:
                    continue  # another worker trains it
            trial = self.ask()
            if trial is None:
                return None
            try:
                run = self.run_of(trial.number, trial.params, new=True)
                return trial.number, run, RunLock(run.dir).acquire()
            except BaseException:
                self.study.tell(trial.number, state=TrialState.FAIL)  # never left RUNNING
                raise

    def ask(self) -> Any:
        """A new trial at a point not tried or queued yet (None: ``n_trials`` reached, or the
        space has no untried point). The sampler is seeded by the trial's number; a draw of
        a tried point is closed as a repeat and, in a finite space, an untried point is
        queued in its place."""
        import random

        from optuna.trial import TrialState

        trials = [t for t in self.study.get_trials(deepcopy=False) if not is_repeat(t)]
        if sum(t.state != TrialState.WAITING for t in trials) >= self.spec.n_trials:
            return None
        tried = {point(t.params): t.number for t in trials}
        size = space_size(self.spec)
        queued = any(t.state == TrialState.WAITING for t in trials)
        for _ in range(MAX_REPEATS):
            if size is not None and len(tried) >= size and not queued:
                print(f"[tune] the space has {size} points and every one is tried: the study "
                      f"stops at {len(trials)} trials (n_trials {self.spec.n_trials})",
                      flush=True)  # fmt: skip
                return None
            number = len(self.study.get_trials(deepcopy=False))
            self.study.sampler = make_sampler(self.spec, sampler_seed(self.spec, number))
            trial = self.study.ask()
            params = suggest(trial, self.spec)
            if tried.get(point(params), trial.number) == trial.number:
                return trial
            trial.set_user_attr(REPEAT, tried[point(params)])
            self.study.tell(trial, state=TrialState.FAIL)
            if size is not None and size <= 100_000:
                untried = [p for p in space_points(self.spec) if point(p) not in tried]
                if untried:
                    self.study.enqueue_trial(random.Random(number).choice(untried))
                    queued = True
        print(f"[tune] the sampler drew {MAX_REPEATS} tried points in a row: the study stops at "
              f"{len(trials)} trials (n_trials {self.spec.n_trials})", flush=True)  # fmt: skip
        return None

    def tell(self, number: int, run: Run, outcome: attempt.RunOutcome) -> str:
        from optuna.trial import TrialState

        if outcome.status == "failed":
            self.study.tell(number, state=TrialState.FAIL)
            return f"failed ({outcome.message})"
        pruned = run.pruned
        if pruned:
            self.study.tell(number, state=TrialState.PRUNED)
            return f"pruned at epoch {pruned.get('epoch')}"
        values = metric_values(run.dir, self.spec.metric)
        if not values:
            self.study.tell(number, state=TrialState.FAIL)
            return f"failed (no {self.spec.metric} logged)"
        best = max(values) if self.spec.direction == "maximize" else min(values)
        self.study.tell(number, best)
        return f"{self.spec.metric} {best:.4f}"

    def loop(self) -> None:
        while not (self.stop and self.stop.received):
            claimed = self.claim()
            if claimed is None:
                return
            number, run, lock = claimed
            try:
                if run.finished:  # trained before `tune` was stopped, not yet told
                    outcome = attempt.RunOutcome(run.variant, run.seed, "done", 0, run.dir)
                else:
                    trial = TrialEnv(self.url, self.spec.study, number, self.spec.metric,
                                     self.spec.pruner)  # fmt: skip
                    self.current = attempt.start(run, lock, self.launcher, env={**self.env, **trial.encode()},
                                                 ignore=(signal.SIGUSR2,))  # fmt: skip
                    if self.stop is not None:
                        self.stop.children.append(self.current.process)
                    outcome = attempt.finish(self.current, self.current.wait())
                    self.current = None
                if outcome.status == "interrupted":
                    self.log.append(f"[tune] trial {number}: interrupted ({outcome.message})")
                    return  # left RUNNING in the study: a re-run resumes it
                with study_lock(self.study_dir):  # not while another worker parses a config
                    said = self.tell(number, run, outcome)
                    print(f"[tune] trial {number}: {said}  {run.items}", flush=True)
            finally:
                lock.release()


class TuneJob:
    """What one SLURM task of ``tune --launcher slurm`` runs: a :class:`Worker` loop. On USR2
    (time limit ahead, preemption) its running trial saves ``last.ckpt`` and the task is
    requeued; the trial stays running in the study and the next worker to start resumes it."""

    def __init__(self, spec_path: str, n_trials: int, base: list[str], study_dir: Path,
                 url: str, index: int) -> None:  # fmt: skip
        self.args = (spec_path, n_trials, base, study_dir, url, index)
        self.worker: Worker | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"args": self.args}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(*state["args"])

    def __call__(self) -> str:
        spec_path, n_trials, base, study_dir, url, index = self.args
        spec = SearchSpec.load(spec_path)
        spec.n_trials = n_trials
        env = {}
        if os.environ.get("SLURM_CPUS_PER_TASK") and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = os.environ["SLURM_CPUS_PER_TASK"]
        self.worker = Worker(spec, base, study_dir, url, env, launcher="slurm")
        self.worker.loop()
        return f"worker {index}: " + ("\n".join(self.worker.log) or "study complete")

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        current = self.worker.current if self.worker else None
        if current is not None:
            current.stop(grace=STOP_GRACE_S)  # SIGKILL if it does not save in time
        return submitit.helpers.DelayedSubmission(TuneJob(*self.args))


def submit_workers(spec: SearchSpec, spec_path: str, base: list[str], study_dir: Path,
                   url: str, workers: int) -> list[str]:  # fmt: skip
    """Submit ``workers`` :class:`TuneJob` tasks as one SLURM array; their job ids."""
    from swin_lightning.runs.launchers import SlurmLauncher

    launcher = SlurmLauncher(spec.launcher.slurm, study_dir / ".submitit", f"tune-{spec.study}")
    executor = launcher.executor()
    with executor.batch():
        jobs = [executor.submit(TuneJob(spec_path, spec.n_trials, base, study_dir, url, i))
                for i in range(workers)]  # fmt: skip
    ids = [job.job_id for job in jobs]
    write_text(study_dir / "jobs.json", json.dumps({"job_ids": ids,
               "stderr": [str(job.paths.stderr) for job in jobs]}))  # fmt: skip
    return ids


def write_manifest(study_dir: Path, spec: SearchSpec, url: str, base: list[str]) -> None:
    record = {"study": spec.study, "storage": url, "metric": spec.metric,
              "direction": spec.direction, "n_trials": spec.n_trials, "base": base,
              "space": list(spec.space), "overlays": [k for k in spec.space if spec.is_overlay(k)]}  # fmt: skip
    write_text(study_dir / MANIFEST, json.dumps(record, indent=1))


def run_search(
    base_configs: list[str],
    spec_path: str,
    log_dir: str = "logs",
    overrides: list[str] | None = None,
    n_trials: int | None = None,
    parallel: int | None = None,
    launcher: LauncherSettings | None = None,
) -> tuple[Path, int | None]:
    """Run workers until the study has its trials; returns the study folder and the signal
    that stopped it (None when the study is complete). With the SLURM launcher the workers
    are submitted as an array and this returns at once."""
    spec = SearchSpec.load(spec_path)
    if n_trials is not None:
        spec.n_trials = n_trials
    settings = replace(launcher or spec.launcher)
    settings.parallel = parallel or settings.parallel
    spec.launcher = settings
    for config in base_configs:
        if not Path(config).is_file():
            raise FileNotFoundError(f"base config {config} not found")
    base = [a for c in base_configs for a in ("--config", c)]
    base += [*cli_args(spec.args), *cli_args(overrides or [])]
    check_space(spec, base)
    study_dir = Path(log_dir) / spec.study
    url = storage_url(spec, study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    study = create_study(spec, url)
    if spec.sampler == "grid":
        enqueue_grid(spec, study, study_dir)
    write_manifest(study_dir, spec, url, base)
    if settings.name == "slurm":
        ids = submit_workers(spec, spec_path, base, study_dir, url, settings.parallel)
        print(f"[tune] {len(ids)} workers submitted as SLURM job(s) {', '.join(ids)}; watch: "
              f"python -m swin_lightning tune status {study_dir}", flush=True)  # fmt: skip
        return study_dir, None
    slots = LocalLauncher(settings.parallel, settings.gpus_per_run, settings.share_gpus).slots(
        [Run("", 0, "", study_dir, base, accelerator=_accelerator(base))]
    )
    errors: list[BaseException] = []
    with SignalForwarder() as forwarder:
        workers = [Worker(spec, base, study_dir, url, env, stop=forwarder) for env in slots]

        def work(w: Worker) -> None:
            try:
                w.loop()
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in workers]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.2)
    for w in workers:
        for line in w.log:
            print(line, file=sys.stderr)
    if errors:
        raise errors[0]
    return study_dir, forwarder.received


def _accelerator(base: list[str]) -> str:
    from swin_lightning.cli import resolved_settings

    return str((resolved_settings(base).get("trainer") or {}).get("accelerator", "auto"))


def _study_dir(argv: list[str], command: str) -> Path:
    args = folder_parser(f"tune {command}", "study").parse_args(argv)
    return campaign_dir(args.study, args.log_dir, MANIFEST)


def _status(argv: list[str]) -> int:
    print_status(_study_dir(argv, "status"))
    return 0


def _report(argv: list[str]) -> int:
    print(f"[tune] report: {write_study_report(_study_dir(argv, 'report'))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return dispatch(argv, {"status": _status, "report": _report}, _launch)


def _launch(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m swin_lightning tune",
                                     description="A hyperparameter search with Optuna. Also: "
                                     "`tune status STUDY`, `tune report STUDY`.")  # fmt: skip
    parser.add_argument("--config", action="append", required=True, help="base config")
    parser.add_argument("spec", help="search spec YAML (study, metric, sampler, space)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every trial")
    parser.add_argument("--log_dir", default="logs")
    parser.add_argument("--n_trials", type=int, help="replace the spec's n_trials")
    add_launcher_flags(parser)
    parser.set_defaults(parallel=None)
    args = parser.parse_intermixed_args(argv)
    if args.n_trials is not None and args.n_trials < 1:
        parser.error(f"--n_trials={args.n_trials} must be >= 1")
    settings = launcher_settings(args, SearchSpec.load(args.spec).launcher)
    study_dir, stopped = run_search(args.config, args.spec, args.log_dir, args.overrides,
                                    args.n_trials, args.parallel, settings)  # fmt: skip
    if settings.name == "slurm":
        return 0
    if stopped:
        print(stop_message("tune", stopped, "trials", "continue the study"), file=sys.stderr)
        return 128 + stopped
    print(f"[tune] report: {write_study_report(study_dir)}")
    return 0
