"""``python -m swin_lightning ablate``: variants x seeds as runs, their status, their report.

    ablate --config BASE.yaml SPEC.yaml [key=value ...] [--parallel N] [--launcher slurm ...]
    ablate status EXPERIMENT        # a table of the runs: state, epoch, best val top-1, job
    ablate report EXPERIMENT        # report.md / report.csv / val_acc1.png of what finished

The spec (:mod:`swin_lightning.runs.spec`) lists variants by hand or as a grid. Every
variant x seed is a normal ``fit`` run logged to
``logs/<experiment>/<variant>/<settings>/seed_<n>``, where ``<settings>`` is a fingerprint
of the run's resolved config (all settings but the seed and where it writes): re-running with
other settings trains new runs beside the old ones and never reports the old ones as theirs.
A re-run skips finished runs, resumes interrupted ones from their ``last.ckpt``, leaves runs
another process holds to it, and reports failed ones with their log (``--retry_failed`` runs
only those again). Runs train here one after another, ``--parallel N`` at once, or as a
SLURM job array (``--launcher slurm``, :mod:`swin_lightning.runs.launchers`). SIGINT/SIGTERM
reach every running run, which saves its ``last.ckpt``; ``ablate`` then stops saying how to
resume. When the runs are done the report is written next to them.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import yaml

from swin_lightning.protocol import SETTINGS
from swin_lightning.report import METRICS, summary_lines, write_comparison, write_report
from swin_lightning.runs.attempt import RunOutcome
from swin_lightning.runs.campaign import campaign_dir, dispatch, folder_parser, stop_message
from swin_lightning.runs.launchers import (
    LocalLauncher,
    SlurmLauncher,
    add_launcher_flags,
    launcher_settings,
)
from swin_lightning.runs.spec import AblationSpec, LauncherSettings, cli_args
from swin_lightning.runs.store import (
    STATES,
    Experiment,
    Run,
    RunStatus,
    fingerprint,
    read_status,
    status_table,
)
from swin_lightning.storage import write_text

__all__ = ["AblationInterrupted", "AblationSpec", "RunOutcome", "main", "run_ablation"]


class AblationInterrupted(Exception):
    """SIGINT or SIGTERM stopped the ablation (the running runs saved their last.ckpt)."""

    def __init__(self, signum: int, outcomes: list[RunOutcome]):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.outcomes = outcomes


def plan(
    base: list[str], spec: AblationSpec, exp_dir: Path, overrides: list[str], extra: list[str]
) -> list[Run]:
    """The runs of the spec, settings resolved once per variant. Every variant is checked
    before anything is written: one that ``fit`` rejects (a typo'd key: the closest valid
    one is named), or two that resolve to the same settings (``lr=0`` and ``lr=0.0``), is a
    ValueError naming them."""
    from swin_lightning.cli import resolved_settings

    resolved: dict[str, tuple[list[str], dict, str]] = {}
    by_fingerprint: dict[str, str] = {}
    for variant, items in spec.variants.items():
        args = [*base, *cli_args(items), *cli_args(spec.args), *cli_args(overrides), *extra]
        try:
            settings = resolved_settings(args)
        except (ValueError, OSError) as err:
            raise ValueError(f"variant {variant!r} of {spec.experiment}: {err}; nothing was "
                             "run: fix the spec and run again") from None  # fmt: skip
        fp = fingerprint(settings)
        if fp in by_fingerprint:
            raise ValueError(f"variants {by_fingerprint[fp]!r} and {variant!r} of "
                             f"{spec.experiment} resolve to the same settings: remove one")  # fmt: skip
        by_fingerprint[fp] = variant
        resolved[variant] = args, settings, fp
    runs = []
    for variant, (args, settings, fp) in resolved.items():
        accelerator = str((settings.get("trainer") or {}).get("accelerator", "auto"))
        settings_file = exp_dir / variant / fp / SETTINGS
        if not settings_file.is_file():
            write_text(settings_file, yaml.safe_dump(settings, sort_keys=False))
        for seed in spec.seeds:
            runs.append(Run(variant, seed, fp, exp_dir / variant / fp / f"seed_{seed}",
                            args, spec.variants[variant], accelerator))  # fmt: skip
    # Seed by seed: every variant's first seed comes early, for a first comparison.
    runs.sort(key=lambda r: spec.seeds.index(r.seed))
    return runs


def select(statuses: list[RunStatus], retry_failed: bool) -> tuple[list[Run], list[RunOutcome]]:
    """The runs to launch now, and outcomes for those left alone: failed runs are re-run only
    with ``retry_failed`` (which then runs nothing else)."""
    todo, left = [], []
    for s in statuses:
        if s.state == "failed" and not retry_failed:
            where = f" (log: {s.log})" if s.log else ""
            left.append(RunOutcome(s.run.variant, s.run.seed, "failed", 0, s.run.dir,
                                   f"failed earlier: {s.message}{where}; --retry_failed "
                                   "runs it again"))  # fmt: skip
        elif s.state == "finished":
            left.append(RunOutcome(s.run.variant, s.run.seed, "skipped", 0, s.run.dir))
        elif not retry_failed or s.state == "failed":
            todo.append(s.run)
    return todo, left


def report_experiment(experiment: Experiment, statuses: list[RunStatus]) -> Path:
    """Write the report of the finished runs (the others are listed with their state) and
    print each variant's line of it."""
    current = finished_run_dirs(statuses)
    failed: dict[str, list[str]] = {}
    notes = []
    for s in statuses:
        if s.state == "finished":
            continue
        if s.state == "failed":
            failed.setdefault(s.run.variant, []).append(str(s.run.seed))
        else:
            notes.append(f"{s.run.variant} seed {s.run.seed}: {s.state}")
    rows = write_report(experiment.dir, experiment.reference, experiment.variants, failed,
                        current, notes, experiment.alpha, experiment.metric)  # fmt: skip
    for line in summary_lines(rows, experiment.metric):
        print(f"[ablate] {line}", flush=True)
    return experiment.dir / "report.md"


def _launcher(settings: LauncherSettings, exp_dir: Path) -> LocalLauncher | SlurmLauncher:
    if settings.name == "slurm":
        return SlurmLauncher(settings.slurm, exp_dir / ".submitit", f"ablate-{exp_dir.name}")
    return LocalLauncher(settings.parallel, settings.gpus_per_run, settings.share_gpus)


def run_ablation(
    base_configs: list[str],
    spec_path: str,
    log_dir: str = "logs",
    overrides: list[str] | None = None,
    seeds: list[int] | None = None,
    launcher: LauncherSettings | None = None,
    retry_failed: bool = False,
    wait: bool = False,
) -> tuple[Path, list[RunOutcome]]:
    """Launch every variant x seed not finished (``launcher``: default the spec's), then write
    the report of what has finished. A SIGINT or SIGTERM stops after the running runs have
    saved (:class:`AblationInterrupted`, no report); a re-run continues."""
    spec = AblationSpec.load(spec_path)
    if seeds:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"--seeds lists a seed twice: {seeds}")
        spec.seeds = seeds
    settings = launcher or spec.launcher
    for config in base_configs:
        if not Path(config).is_file():
            raise FileNotFoundError(f"base config {config} not found")
    base = [a for c in base_configs for a in ("--config", c)]
    exp_dir = Path(log_dir) / spec.experiment
    chosen = _launcher(settings, exp_dir)
    extra = chosen.run_args() if isinstance(chosen, SlurmLauncher) else []
    runs = plan(base, spec, exp_dir, overrides or [], extra)
    outcomes = []
    experiment = Experiment(exp_dir, spec.reference, list(spec.variants), runs, settings.name,
                            spec.alpha, spec.metric)  # fmt: skip
    experiment.save()
    todo, left = select([read_status(r, progress=False) for r in runs], retry_failed)
    outcomes += left
    for o in left:
        note = f": {o.message}" if o.message else " (finished before)"
        print(f"[ablate] {o.variant} seed {o.seed}: {o.status}{note}", flush=True)
    launched, stopped_by = chosen.launch(todo, log=lambda line: print(line, flush=True))
    outcomes += launched
    if stopped_by:
        again = "resume (finished runs are skipped, interrupted ones resume from their last.ckpt)"
        print(stop_message("ablate", stopped_by, "runs", again), file=sys.stderr, flush=True)
        raise AblationInterrupted(stopped_by, outcomes)
    if isinstance(chosen, SlurmLauncher):
        print(f"[ablate] watch: python -m swin_lightning ablate status {exp_dir}", flush=True)
        if not wait:
            print(f"[ablate] when done: python -m swin_lightning ablate report {exp_dir}")
            return exp_dir, outcomes
        statuses = wait_for(experiment)
    else:
        statuses = [read_status(r, progress=False) for r in runs]
    try:
        report = report_experiment(experiment, statuses)
        print(f"[ablate] report: {report}", flush=True)
    except FileNotFoundError as err:
        print(f"[ablate] no report: {err}", file=sys.stderr)
    return exp_dir, outcomes


def wait_for(experiment: Experiment, every_s: float = 10.0) -> list[RunStatus]:
    """Poll the runs until none is pending or running (saying so when the counts change);
    returns their statuses."""
    shown = ""
    while True:
        statuses = [read_status(r, progress=False) for r in experiment.runs]
        counts = ", ".join(f"{sum(s.state == state for s in statuses)} {state}"
                           for state in STATES if any(s.state == state for s in statuses))  # fmt: skip
        if counts != shown:
            print(f"[ablate] {time.strftime('%H:%M:%S')} {counts}", flush=True)
            shown = counts
        if not any(s.state in ("pending", "running") for s in statuses):
            return statuses
        time.sleep(every_s)


def _load_experiment(argv: list[str], command: str, description: str) -> Experiment:
    args = folder_parser(f"ablate {command}", "experiment", description).parse_args(argv)
    return Experiment.load(campaign_dir(args.experiment, args.log_dir, "experiment.json"))


def _show_status(argv: list[str]) -> int:
    experiment = _load_experiment(argv, "status", "Where each run of an experiment stands.")
    print(status_table(experiment, [read_status(r) for r in experiment.runs]))
    return 0


def finished_run_dirs(statuses: list[RunStatus]) -> dict[str, list[Path]]:
    """The folders of the finished runs among ``statuses``, by variant."""
    current: dict[str, list[Path]] = {}
    for s in statuses:
        if s.state == "finished":
            current.setdefault(s.run.variant, []).append(s.run.dir)
    return current


def _write_report(argv: list[str]) -> int:
    parser = folder_parser("ablate report", "experiment",
                           "Report the finished runs of an experiment.")  # fmt: skip
    parser.add_argument("--alpha", type=float, default=None,
                        help="significance level of the verdicts (default: the spec's)")  # fmt: skip
    parser.add_argument("--metric", choices=METRICS, default=None,
                        help="val top-1 the tests compare (default: the spec's)")  # fmt: skip
    parser.add_argument("--compare", nargs="+", default=[], metavar="OTHER",
                        help="other experiments (folder or name under --log_dir) to put in "
                             "one table with this one")  # fmt: skip
    args = parser.parse_args(argv)
    experiment = Experiment.load(campaign_dir(args.experiment, args.log_dir, "experiment.json"))
    alpha = experiment.alpha if args.alpha is None else args.alpha
    metric = args.metric or experiment.metric
    if not args.compare:
        experiment.alpha, experiment.metric = alpha, metric
        statuses = [read_status(r, progress=False) for r in experiment.runs]
        print(f"[ablate] report: {report_experiment(experiment, statuses)}")
        return 0
    others = [Experiment.load(campaign_dir(o, args.log_dir, "experiment.json"))
              for o in args.compare]  # fmt: skip
    table = [(e.dir, e.reference, e.variants,
              finished_run_dirs([read_status(r, progress=False) for r in e.runs]))
             for e in [experiment, *others]]  # fmt: skip
    print(f"[ablate] comparison: {write_comparison(table, alpha, metric)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return dispatch(argv, {"status": _show_status, "report": _write_report}, _launch)


def _launch(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        settings = launcher_settings(args, AblationSpec.load(args.spec).launcher)
        _, outcomes = run_ablation(args.config, args.spec, args.log_dir, args.overrides,
                                   args.seeds, settings, args.retry_failed, args.wait)  # fmt: skip
    except AblationInterrupted as stop:
        return 128 + stop.signum
    for o in outcomes:
        if o.status == "failed":
            where = f" (log: {o.run_dir / 'fit.log'})" if o.run_dir else ""
            print(f"[ablate] FAILED: {o.variant} seed {o.seed}{where}", file=sys.stderr)
        if o.status == "busy":
            print(f"[ablate] NOT RUN: {o.variant} seed {o.seed}: {o.message}", file=sys.stderr)
    return 1 if any(o.status in ("failed", "busy") for o in outcomes) else 0


def seed_list(text: str) -> list[int]:
    """``--seeds 0,1,2``."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``ablate`` (launch); ``status`` and ``report`` have their own."""
    parser = argparse.ArgumentParser(
        prog="python -m swin_lightning ablate",
        description="Run an ablation (variants x seeds, each a fit run) and write its report. "
        "Also: `ablate status EXPERIMENT`, `ablate report EXPERIMENT`.",
    )
    parser.add_argument("--config", action="append", required=True,
                        help="base config (repeat to compose overlays)")  # fmt: skip
    parser.add_argument("spec", help="ablation spec YAML (variants or grid, seeds, reference)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    parser.add_argument("--log_dir", default="logs", help="root folder of the experiment")
    parser.add_argument(
        "--seeds",
        type=seed_list,
        help="replace the spec's seeds, e.g. 0,1",
    )
    parser.add_argument("--retry_failed", action="store_true",
                        help="run again only the runs that failed")  # fmt: skip
    parser.add_argument("--wait", action="store_true",
                        help="with --launcher slurm: wait for the runs, then write the report")  # fmt: skip
    add_launcher_flags(parser)
    return parser
