"""Ablation reports read back from TensorBoard event files.

An experiment folder holds ``<variant>/<settings>/seed_<n>/`` runs (as written by
``ablate``; ``<settings>`` is the fingerprint of the run's resolved config). For each run the
report reads val top-1 per epoch, the final losses, the model size and the training
throughput from its events; it then aggregates seeds (mean +- sample std) per variant and
compares every variant with the reference. A run whose event files are damaged (a record
that fails its checksum) or hold no val top-1 is listed as damaged, and the others are
reported.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from swin_lightning.events import DamagedRunError, read_scalars, scalar_values
from swin_lightning.protocol import FINISHED, SETTINGS
from swin_lightning.stats import (
    MAX_SEEDS,
    Comparison,
    Interval,
    compare,
    holm,
    mean_interval,
    verdict,
)
from swin_lightning.storage import atomic_open, save_figure, write_text

VAL_ACC = "val/acc1"


@dataclass
class RunResult:
    """Curves and final figures of one run, read from its event files."""

    variant: str
    seed: str
    val_acc1: list[float]
    val_loss: list[float]
    train_loss: list[float]
    params: float | None = None
    gmacs: float | None = None
    samples_per_sec: float | None = None
    wall_seconds: float | None = None
    peak_mem_mb: float | None = None
    gpus: float | None = None
    cpu_threads: float | None = None

    @property
    def compute_hours(self) -> float | None:
        """Device-hours of the run: GPU-hours on GPUs, CPU-thread-hours on the CPU."""
        if self.wall_seconds is None or self.gpus is None:
            return None
        return self.wall_seconds * (self.gpus or self.cpu_threads or 1) / 3600

    def value(self, metric: str) -> float:
        """``best`` or ``final`` val top-1."""
        return self.best_val_acc1 if metric == "best" else self.final_val_acc1

    @property
    def best_val_acc1(self) -> float:
        return max(self.val_acc1)

    @property
    def final_val_acc1(self) -> float:
        return self.val_acc1[-1]


def read_run(run_dir: Path, variant: str, seed: str) -> RunResult | None:
    """A run's figures, or None if it logged no validation top-1 yet; a damaged event file
    raises :class:`DamagedRunError`."""
    series = read_scalars(run_dir)
    val_acc1 = scalar_values(series, VAL_ACC)
    if not val_acc1:
        return None
    params = scalar_values(series, "model/params")
    gmacs = scalar_values(series, "model/gmacs")
    speed = scalar_values(series, "train/device/samples_per_sec")
    last = {tag: values[-1] if values else None
            for tag in ("wall_seconds", "gpus", "cpu_threads")
            for values in [scalar_values(series, f"cost/{tag}")]}  # fmt: skip
    memory = scalar_values(series, "cost/peak_mem_mb")
    return RunResult(
        variant=variant,
        seed=seed,
        val_acc1=val_acc1,
        val_loss=scalar_values(series, "val/loss"),
        train_loss=scalar_values(series, "train/loss"),
        params=params[-1] if params else None,
        gmacs=gmacs[-1] if gmacs else None,
        samples_per_sec=statistics.median(speed) if speed else None,
        peak_mem_mb=max(memory) if memory else None,
        **last,
    )


def finished_runs(exp_dir: str | Path) -> dict[str, list[Path]]:
    """The finished runs below ``exp_dir`` by variant, each variant with its most recently
    finished settings only (runs whose ``finished.json`` matches their settings folder)."""
    by_settings: dict[tuple[str, Path], list[Path]] = {}
    for marker in sorted(Path(exp_dir).glob(f"*/*/seed_*/{FINISHED}")):
        run_dir = marker.parent
        try:
            recorded = json.loads(marker.read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            continue
        if recorded == run_dir.parent.name:
            by_settings.setdefault((run_dir.parent.parent.name, run_dir.parent), []).append(run_dir)
    newest: dict[str, list[Path]] = {}
    for (variant, _), runs in sorted(
        by_settings.items(), key=lambda item: max((r / FINISHED).stat().st_mtime for r in item[1])
    ):
        newest[variant] = runs  # later settings replace earlier ones
    return newest


def read_experiment(
    exp_dir: str | Path,
    run_dirs: dict[str, list[Path]] | None = None,
    damaged: dict[str, str] | None = None,
) -> dict[str, list[RunResult]]:
    """Results of ``run_dirs`` (variant -> run folders; default :func:`finished_runs`), by
    variant. A damaged run, or one without val top-1, is left out and named in ``damaged``
    (run folder -> reason) when given."""
    run_dirs = finished_runs(exp_dir) if run_dirs is None else run_dirs
    runs: dict[str, list[RunResult]] = {}
    for variant, dirs in run_dirs.items():
        for run_dir in dirs:
            try:
                result = read_run(run_dir, variant, run_dir.name.removeprefix("seed_"))
                if result is None:
                    raise DamagedRunError(f"{run_dir}: no {VAL_ACC} in its event files")
            except (DamagedRunError, OSError) as err:
                if damaged is not None:
                    damaged[str(run_dir)] = str(err)
                continue
            runs.setdefault(variant, []).append(result)
    return runs


METRICS = ("final", "best")  # which val top-1 of a run the statistics test


@dataclass
class VariantSummary:
    """One row of the report: a variant aggregated over its seeds, and its comparison with
    the reference on ``metric`` (the reference's own row has none)."""

    variant: str
    seeds: list[str]
    best: Interval
    final: Interval
    final_val_loss: float
    final_train_loss: float
    params: float | None
    gmacs: float | None
    samples_per_sec: float | None
    peak_mem_mb: float | None = None
    wall_seconds: float | None = None  # mean per run
    compute_hours: float | None = None  # all its runs together
    compute_unit: str = "CPU-h"
    delta_best: float = math.nan
    delta_final: float = math.nan
    comparison: Comparison | None = None
    p_holm: float = math.nan
    verdict: str = ""


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _summary(variant: str, results: list[RunResult], level: float) -> VariantSummary:
    hours = [r.compute_hours for r in results]
    on_gpu = any(r.gpus for r in results)
    walls = [r.wall_seconds for r in results if r.wall_seconds is not None]
    return VariantSummary(
        variant=variant,
        seeds=[r.seed for r in results],
        best=mean_interval([r.best_val_acc1 for r in results], level),
        final=mean_interval([r.final_val_acc1 for r in results], level),
        final_val_loss=mean_interval([r.val_loss[-1] for r in results if r.val_loss]).mean,
        final_train_loss=mean_interval([r.train_loss[-1] for r in results if r.train_loss]).mean,
        params=results[0].params,
        gmacs=results[0].gmacs,
        samples_per_sec=_median([r.samples_per_sec for r in results]),
        peak_mem_mb=max((r.peak_mem_mb for r in results if r.peak_mem_mb), default=None),
        wall_seconds=statistics.fmean(walls) if walls else None,
        compute_hours=sum(hours) if None not in hours else None,
        compute_unit="GPU-h" if on_gpu else "CPU-h",
    )


def summarize(
    runs: dict[str, list[RunResult]],
    reference: str | None = None,
    order: list[str] | None = None,
    alpha: float = 0.05,
    metric: str = "final",
    references: dict[str, str] | None = None,
) -> list[VariantSummary]:
    """Aggregate seeds per variant and compare each with ``reference`` (default: the first)
    on ``metric`` val top-1 at level ``alpha`` (intervals at 1 - alpha), Holm-corrected
    across the report's comparisons. ``references`` (variant -> its reference) replaces the
    one reference, for tables of several experiments."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: choose one of {list(METRICS)}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must lie between 0 and 1 (e.g. 0.05)")
    level = 1 - alpha
    order = [v for v in (order or sorted(runs)) if v in runs]
    rows = {v: _summary(v, runs[v], level) for v in order}
    first = order[0] if order else None
    refs = references or {v: reference if reference in runs else first for v in order}
    for variant, row in rows.items():
        ref = refs.get(variant)
        if ref not in rows:
            continue
        row.delta_best = row.best.mean - rows[ref].best.mean
        row.delta_final = row.final.mean - rows[ref].final.mean
        if ref != variant:
            by_seed = {r.seed: r.value(metric) for r in runs[variant]}
            ref_by_seed = {r.seed: r.value(metric) for r in runs[ref]}
            row.comparison = compare(by_seed, ref_by_seed, level, alpha)
    compared = [r for r in rows.values() if r.comparison is not None]
    for row, p in zip(compared, holm([r.comparison.p for r in compared]), strict=True):
        row.p_holm = p
        row.verdict = verdict(row.comparison, p, alpha)
    return list(rows.values())


def _fmt(value: float | None, spec: str) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value)))
        else format(value, spec)
    )


def _pct(interval: Interval) -> str:
    """``mean +- std [low, high]`` in percent; one seed: the value and why no interval."""
    if interval.n == 1:
        return f"{100 * interval.mean:.1f} (1 seed: no interval)"
    return (f"{_fmt(100 * interval.mean, '.1f')} +- {_fmt(100 * interval.std, '.1f')} "
            f"[{_fmt(100 * interval.low, '.1f')}, {_fmt(100 * interval.high, '.1f')}]")  # fmt: skip


def _seeds_needed(c: Comparison) -> str:
    if c.test == "none":
        return "n/a"
    if math.isinf(c.seeds_needed):
        return "never (no difference)" if c.diff == 0 else f"> {MAX_SEEDS}"
    return str(int(c.seeds_needed))


def _p(value: float) -> str:
    return "n/a" if math.isnan(value) else "< 0.001" if value < 0.001 else f"{value:.3f}"


def markdown_table(
    rows: list[VariantSummary], reference: str, metric: str = "final", alpha: float = 0.05
) -> str:
    """The accuracy table in markdown: val top-1 in percent with the 1 - alpha interval,
    each variant's difference to its reference on ``metric`` in percentage points, p (raw
    and Holm-corrected), verdict and the seeds 80% power would need."""
    level = f"{100 * (1 - alpha):g}%"
    head = (
        f"| variant | seeds | best val top-1 (%) | final val top-1 (%) "
        f"| {metric} vs {reference} (pp) [{level} CI] | test | p | p (Holm) | verdict "
        "| seeds for 80% power |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        c = r.comparison
        if c is None:
            versus = test = p = p_holm = seeds = "n/a"
            judged = "reference"
        else:
            ci = "" if math.isnan(c.low) else f" [{100 * c.low:+.1f}, {100 * c.high:+.1f}]"
            versus = f"{100 * c.diff:+.1f}{ci}"
            test = f"{c.test} (n={c.n})" if c.test != "none" else "none"
            p, p_holm, judged, seeds = _p(c.p), _p(r.p_holm), r.verdict, _seeds_needed(c)
        lines.append(f"| {r.variant} | {len(r.seeds)} | {_pct(r.best)} | {_pct(r.final)} "
                     f"| {versus} | {test} | {p} | {p_holm} | {judged} | {seeds} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def summary_lines(rows: list[VariantSummary], metric: str = "final") -> list[str]:
    """One line per variant: its ``metric`` val top-1 with interval, and its verdict."""
    lines = []
    for r in rows:
        value = r.final if metric == "final" else r.best
        line = f"{r.variant}: {metric} val top-1 {_pct(value)} %"
        c = r.comparison
        if c is None:
            line += " (reference)" if not math.isnan(r.delta_final) else ""
        elif c.test == "none":
            line += f", {100 * c.diff:+.1f} pp: {r.verdict}"
        else:
            line += (f", {100 * c.diff:+.1f} pp [{100 * c.low:+.1f}, {100 * c.high:+.1f}], "
                     f"{c.test} t-test p (Holm) {_p(r.p_holm)}: {r.verdict}; seeds for 80% "
                     f"power: {_seeds_needed(c)}")  # fmt: skip
        lines.append(line)
    return lines


def cost_table(rows: list[VariantSummary]) -> str:
    """What each variant costs, as the paper's tables give it: parameters, GFLOPs (the paper
    counts a multiply-add as one FLOP), training images/s, peak memory, wall time per run and
    the compute of all its runs; the last line is the experiment's total."""
    lines = ["| variant | params | GFLOPs | train img/s | peak memory (MiB) | wall time per run "
             "| compute |", "|" + "---|" * 7]  # fmt: skip
    for r in rows:
        compute = _fmt(r.compute_hours, ".3f")
        lines.append(f"| {r.variant} | {_fmt(r.params, ',.0f')} | {_fmt(r.gmacs, '.4f')} "
                     f"| {_fmt(r.samples_per_sec, '.0f')} | {_fmt(r.peak_mem_mb, ',.0f')} "
                     f"| {_duration(r.wall_seconds)} "
                     f"| {compute}{' ' + r.compute_unit if compute != 'n/a' else ''} |")  # fmt: skip
    total = [r.compute_hours for r in rows]
    units = {r.compute_unit for r in rows}
    if None not in total and len(units) == 1:
        lines.append(f"| **total** | | | | | | **{sum(total):.3f} {units.pop()}** |")
    return "\n".join(lines) + "\n"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


CSV_FIELDS = [
    "variant", "seeds", "best_val_acc1_mean", "best_val_acc1_std", "best_val_acc1_ci_low",
    "best_val_acc1_ci_high", "final_val_acc1_mean", "final_val_acc1_std",
    "final_val_acc1_ci_low", "final_val_acc1_ci_high", "final_val_loss_mean",
    "final_train_loss_mean", "params", "gmacs", "train_samples_per_sec", "peak_mem_mb",
    "wall_seconds_per_run", "compute_hours", "compute_unit", "delta_best_vs_reference",
    "delta_final_vs_reference", "metric", "delta", "delta_ci_low", "delta_ci_high", "test",
    "n", "p", "p_holm", "verdict", "seeds_for_80pct_power",
]  # fmt: skip


def write_csv(rows: list[VariantSummary], path: Path, metric: str = "final") -> None:
    with atomic_open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for r in rows:
            c = r.comparison
            versus = ([metric, c.diff, c.low, c.high, c.test, c.n, c.p, r.p_holm, r.verdict,
                       c.seeds_needed] if c else [metric, 0.0, "", "", "reference", "", "", "",
                                                  "reference", ""])  # fmt: skip
            writer.writerow(
                [r.variant, " ".join(r.seeds), r.best.mean, r.best.std, r.best.low, r.best.high,
                 r.final.mean, r.final.std, r.final.low, r.final.high, r.final_val_loss,
                 r.final_train_loss, r.params, r.gmacs, r.samples_per_sec, r.peak_mem_mb,
                 r.wall_seconds, r.compute_hours, r.compute_unit, r.delta_best, r.delta_final,
                 *versus]
            )  # fmt: skip


def plot_curves(
    runs: dict[str, list[RunResult]], path: Path, order: list[str] | None = None,
    alpha: float = 0.05,
) -> None:  # fmt: skip
    """Val top-1 per epoch: the mean over seeds, a light band from the lowest to the highest
    seed and a darker one for the 1 - alpha interval of the mean (two or more seeds)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.subplots()
    for variant in [v for v in (order or sorted(runs)) if v in runs]:
        curves = [r.val_acc1 for r in runs[variant]]
        epochs = min(len(c) for c in curves)
        per_epoch = [[c[e] for c in curves] for e in range(epochs)]
        x = list(range(1, epochs + 1))
        bands = [mean_interval(v, 1 - alpha) for v in per_epoch]
        mean = [100 * b.mean for b in bands]
        line = ax.plot(x, mean, marker="o", ms=3, label=f"{variant} (n={len(curves)})")[0]
        ax.fill_between(
            x, [100 * min(v) for v in per_epoch], [100 * max(v) for v in per_epoch],
            color=line.get_color(), alpha=0.12, linewidth=0,
        )  # fmt: skip
        if len(curves) > 1:
            ax.fill_between(x, [100 * b.low for b in bands], [100 * b.high for b in bands],
                            color=line.get_color(), alpha=0.3, linewidth=0)  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"{path.parent.name}: val top-1, mean over seeds\n(dark band: "
                 f"{100 * (1 - alpha):g}% CI of the mean; light band: min to max)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def write_tensorboard_text(exp_dir: Path, text: str) -> None:
    """The report as TensorBoard text (``<exp_dir>/report``, tab TEXT), replacing the last."""
    from torch.utils.tensorboard import SummaryWriter

    folder = exp_dir / "report"
    for old in folder.glob("events.out.tfevents.*"):
        old.unlink()
    with SummaryWriter(str(folder)) as writer:
        writer.add_text("ablation_report", text)


def explain(reference: str, metric: str, alpha: float) -> str:
    """What the report's tables mean, below them."""
    level = f"{100 * (1 - alpha):g}%"
    return (
        f"\nVal top-1: mean +- sample standard deviation over seeds [{level} Student-t interval "
        f"of the mean]. Each variant is compared with {reference} on its {metric} val top-1: "
        "the difference of the means in percentage points with its interval, from a t-test "
        "paired by seed when both ran the same seeds (same seed: same initialization and data "
        "order), Welch's t-test otherwise (a seed missing in one arm); p is two-sided and "
        "Holm-corrected across the comparisons of this table. The verdict is taken at "
        f"alpha = {alpha:g} on the corrected p. Seeds for 80% power: the seeds per variant a "
        "t-test would need to detect the observed difference 80% of the time at that alpha "
        "(more seeds than that: stop; fewer: add seeds before believing a null result). One "
        "seed gives no interval and no test. Read from the TensorBoard event files below "
        "this folder.\n"
    )


def write_report(
    exp_dir: str | Path,
    reference: str | None = None,
    order: list[str] | None = None,
    failed: dict[str, list[str]] | None = None,
    run_dirs: dict[str, list[Path]] | None = None,
    not_finished: list[str] | None = None,
    alpha: float = 0.05,
    metric: str = "final",
) -> list[VariantSummary]:
    """Write ``report.md``, ``report.csv``, ``val_acc1.png`` and the report as TensorBoard
    text into ``exp_dir`` for ``run_dirs`` (variant -> run folders; default: each variant's
    newest finished settings); ``not_finished`` lists the runs still to come (one line each,
    e.g. "shift seed 2: running"). Statistics: :func:`summarize`."""
    exp_dir = Path(exp_dir)
    run_dirs = finished_runs(exp_dir) if run_dirs is None else run_dirs
    damaged: dict[str, str] = {}
    runs = read_experiment(exp_dir, run_dirs, damaged)
    if not runs:
        listed = "".join(f"; {reason}" for reason in damaged.values())
        raise FileNotFoundError(f"no finished runs with {VAL_ACC} below {exp_dir}{listed}")
    rows = summarize(runs, reference, order, alpha, metric)
    reference = reference if reference in runs else rows[0].variant
    text = f"# Ablation report: {exp_dir.name}\n\n" + markdown_table(rows, reference, metric, alpha)
    text += explain(reference, metric, alpha)
    text += "\n## Cost\n\n" + cost_table(rows) + COST_NOTE
    text += "\n![val top-1](val_acc1.png)\n"
    text += "\n## Settings shown\n\n"
    for variant in [v for v in (order or sorted(run_dirs)) if v in run_dirs]:
        folders = sorted({d.parent for d in run_dirs[variant]})
        shown = ", ".join(f"`{f.name}` ({f.relative_to(exp_dir) / SETTINGS})" for f in folders)
        text += f"- {variant}: {shown}\n"
    text += (
        "\nEach settings id is a fingerprint of the runs' resolved config (all but the seed "
        "and output paths); runs of other settings in this folder are not in this report.\n"
    )
    for variant, seeds in (failed or {}).items():
        text += f"\n**{variant} failed** for seed(s) {', '.join(seeds)}: see their fit.log.\n"
    for run_dir, reason in damaged.items():
        text += f"\n**damaged run, not reported:** {run_dir}: {reason}\n"
    if not_finished:
        text += "\n## Not finished yet (not in this report)\n\n"
        text += "".join(f"- {line}\n" for line in not_finished)
    write_text(exp_dir / "report.md", text)
    write_csv(rows, exp_dir / "report.csv", metric)
    plot_curves(runs, exp_dir / "val_acc1.png", order, alpha)
    write_tensorboard_text(exp_dir, text)
    return rows


COST_NOTE = (
    "\nGFLOPs per image as the paper counts them (one multiply-add is one FLOP). Train "
    "img/s: median of the runs' throughput; peak memory: the largest of the runs (CUDA "
    "allocations on a GPU, the process's resident set on the CPU); wall time: mean per run "
    "of the time in training and validation epochs (start-up not counted); compute: all runs "
    "of the variant, wall time x GPUs (GPU-h) or x torch threads (CPU-h).\n"
)


def write_comparison(
    experiments: list[tuple[Path, str, list[str], dict[str, list[Path]]]],
    alpha: float = 0.05,
    metric: str = "final",
) -> Path:
    """One table of several experiments' variants (``(folder, reference, variants, run
    folders)`` each, the first one's folder gets it): every variant is compared with its own
    experiment's reference, Holm-corrected across the whole table. Written to the first
    folder as ``compare_<others>.md`` and ``.csv``; returns the markdown path."""
    runs: dict[str, list[RunResult]] = {}
    references: dict[str, str] = {}
    order: list[str] = []
    damaged: dict[str, str] = {}
    for exp_dir, reference, variants, run_dirs in experiments:
        found = read_experiment(exp_dir, run_dirs, damaged)
        if not found:
            raise FileNotFoundError(f"no finished runs with {VAL_ACC} below {exp_dir}")
        ref = reference if reference in found else next(v for v in variants if v in found)
        for variant in [v for v in variants if v in found]:
            name = f"{exp_dir.name}/{variant}"
            runs[name] = [replace(r, variant=name) for r in found[variant]]
            references[name] = f"{exp_dir.name}/{ref}"
            order.append(name)
    rows = summarize(runs, None, order, alpha, metric, references)
    first = experiments[0][0]
    names = "_".join(e[0].name for e in experiments[1:])
    title = " vs ".join(e[0].name for e in experiments)
    text = f"# Ablation comparison: {title}\n\n"
    text += markdown_table(rows, "its experiment's reference", metric, alpha)
    text += explain("its own experiment's reference", metric, alpha)
    text += "\n## Cost\n\n" + cost_table(rows) + COST_NOTE
    for run_dir, reason in damaged.items():
        text += f"\n**damaged run, not reported:** {run_dir}: {reason}\n"
    out = first / f"compare_{names}.md"
    write_text(out, text)
    write_csv(rows, out.with_suffix(".csv"), metric)
    return out
