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
from dataclasses import dataclass, field
from pathlib import Path

from swin_lightning.events import DamagedRunError, read_scalars, scalar_values
from swin_lightning.protocol import FINISHED, SETTINGS
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
    return RunResult(
        variant=variant,
        seed=seed,
        val_acc1=val_acc1,
        val_loss=scalar_values(series, "val/loss"),
        train_loss=scalar_values(series, "train/loss"),
        params=params[-1] if params else None,
        gmacs=gmacs[-1] if gmacs else None,
        samples_per_sec=statistics.median(speed) if speed else None,
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


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class VariantSummary:
    """One row of the report: a variant aggregated over its seeds."""

    variant: str
    seeds: list[str]
    best: tuple[float, float]
    final: tuple[float, float]
    final_val_loss: tuple[float, float]
    final_train_loss: tuple[float, float]
    params: float | None
    gmacs: float | None
    samples_per_sec: float | None
    delta_best: float = math.nan
    delta_final: float = math.nan
    failed: list[str] = field(default_factory=list)


def summarize(
    runs: dict[str, list[RunResult]], reference: str | None = None, order: list[str] | None = None
) -> list[VariantSummary]:
    """Aggregate seeds per variant; deltas are against ``reference`` (default: first)."""
    order = [v for v in (order or sorted(runs)) if v in runs]
    rows = []
    for variant in order:
        results = runs[variant]
        speeds = [r.samples_per_sec for r in results if r.samples_per_sec is not None]
        rows.append(
            VariantSummary(
                variant=variant,
                seeds=[r.seed for r in results],
                best=_mean_std([r.best_val_acc1 for r in results]),
                final=_mean_std([r.final_val_acc1 for r in results]),
                final_val_loss=_mean_std([r.val_loss[-1] for r in results if r.val_loss]),
                final_train_loss=_mean_std([r.train_loss[-1] for r in results if r.train_loss]),
                params=results[0].params,
                gmacs=results[0].gmacs,
                samples_per_sec=statistics.median(speeds) if speeds else None,
            )
        )
    ref = next((r for r in rows if r.variant == reference), rows[0] if rows else None)
    for row in rows:
        row.delta_best = row.best[0] - ref.best[0]
        row.delta_final = row.final[0] - ref.final[0]
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def markdown_table(rows: list[VariantSummary], reference: str) -> str:
    """The report table in markdown; accuracies in percent, deltas in percentage points."""
    head = (
        "| variant | seeds | best val top-1 (%) | final val top-1 (%) | final val loss "
        "| final train loss | params | GMACs | train img/s "
        f"| best vs {reference} (pp) | final vs {reference} (pp) |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r.variant} | {len(r.seeds)} "
            f"| {_fmt(100 * r.best[0], '.1f')} +- {_fmt(100 * r.best[1], '.1f')} "
            f"| {_fmt(100 * r.final[0], '.1f')} +- {_fmt(100 * r.final[1], '.1f')} "
            f"| {_fmt(r.final_val_loss[0], '.3f')} | {_fmt(r.final_train_loss[0], '.3f')} "
            f"| {_fmt(r.params, ',.0f')} | {_fmt(r.gmacs, '.4f')} | {_fmt(r.samples_per_sec, '.0f')} "
            f"| {_fmt(100 * r.delta_best, '+.1f')} | {_fmt(100 * r.delta_final, '+.1f')} |"
        )
    return "\n".join(lines) + "\n"


CSV_FIELDS = [
    "variant", "seeds", "best_val_acc1_mean", "best_val_acc1_std", "final_val_acc1_mean",
    "final_val_acc1_std", "final_val_loss_mean", "final_train_loss_mean", "params", "gmacs",
    "train_samples_per_sec", "delta_best_vs_reference", "delta_final_vs_reference",
]  # fmt: skip


def write_csv(rows: list[VariantSummary], path: Path) -> None:
    with atomic_open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for r in rows:
            writer.writerow(
                [r.variant, " ".join(r.seeds), *r.best, *r.final, r.final_val_loss[0],
                 r.final_train_loss[0], r.params, r.gmacs, r.samples_per_sec, r.delta_best,
                 r.delta_final]
            )  # fmt: skip


def plot_curves(runs: dict[str, list[RunResult]], path: Path, order: list[str] | None = None):
    """Val top-1 per epoch: the mean over seeds with a band from the lowest to the highest."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.subplots()
    for variant in [v for v in (order or sorted(runs)) if v in runs]:
        curves = [r.val_acc1 for r in runs[variant]]
        epochs = min(len(c) for c in curves)
        per_epoch = [[c[e] for c in curves] for e in range(epochs)]
        x = list(range(1, epochs + 1))
        mean = [100 * statistics.fmean(v) for v in per_epoch]
        line = ax.plot(x, mean, marker="o", ms=3, label=f"{variant} (n={len(curves)})")[0]
        ax.fill_between(
            x, [100 * min(v) for v in per_epoch], [100 * max(v) for v in per_epoch],
            color=line.get_color(), alpha=0.2,
        )  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"{path.parent.name}: val top-1, mean over seeds (band: min to max)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def write_report(
    exp_dir: str | Path,
    reference: str | None = None,
    order: list[str] | None = None,
    failed: dict[str, list[str]] | None = None,
    run_dirs: dict[str, list[Path]] | None = None,
    not_finished: list[str] | None = None,
) -> list[VariantSummary]:
    """Write ``report.md``, ``report.csv`` and ``val_acc1.png`` into ``exp_dir`` for
    ``run_dirs`` (variant -> run folders; default: each variant's newest finished settings);
    ``not_finished`` lists the runs still to come (one line each, e.g. "shift seed 2: running")."""
    exp_dir = Path(exp_dir)
    run_dirs = finished_runs(exp_dir) if run_dirs is None else run_dirs
    damaged: dict[str, str] = {}
    runs = read_experiment(exp_dir, run_dirs, damaged)
    if not runs:
        listed = "".join(f"; {reason}" for reason in damaged.values())
        raise FileNotFoundError(f"no finished runs with {VAL_ACC} below {exp_dir}{listed}")
    rows = summarize(runs, reference, order)
    reference = reference if reference in runs else rows[0].variant
    text = f"# Ablation report: {exp_dir.name}\n\n" + markdown_table(rows, reference)
    text += (
        f"\nMean +- sample standard deviation over seeds; reference variant: {reference}. "
        "Read from the TensorBoard event files below this folder.\n\n![val top-1](val_acc1.png)\n"
    )
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
    write_csv(rows, exp_dir / "report.csv")
    plot_curves(runs, exp_dir / "val_acc1.png", order)
    return rows
