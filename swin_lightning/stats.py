"""Statistics of an ablation over seeds (ground floor: scipy only).

Each variant is a sample of runs, one per seed. The report gives each its mean with a Student-t
confidence interval, and each variant's difference to the reference with its interval and
p-value: paired by seed when both ran the same seeds (same seed, same data order and
initialization), Welch's unequal-variance t-test otherwise. The p-values of one report are
corrected together (Holm), and the number of seeds that would detect the observed difference
at 80% power tells whether adding seeds is worth it. The distributions are scipy.stats's.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats

POWER = 0.8  # the power that seeds_needed aims for
MAX_SEEDS = 1000  # seeds_needed gives up beyond this (returns math.inf)


@dataclass(frozen=True)
class Interval:
    """Mean, sample standard deviation and the ``level`` Student-t interval of the mean over
    ``n`` values; with one value there is no spread and no interval (NaN), never a fake one."""

    mean: float
    std: float
    low: float
    high: float
    n: int


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """:class:`Interval` of ``values`` (NaN throughout for none)."""
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(mean, math.nan, math.nan, math.nan, 1)
    std = statistics.stdev(values)
    if std == 0:
        return Interval(mean, 0.0, mean, mean, n)
    low, high = stats.t.interval(level, n - 1, loc=mean, scale=std / math.sqrt(n))
    return Interval(mean, std, float(low), float(high), n)


@dataclass(frozen=True)
class Comparison:
    """A variant against the reference: ``diff`` = variant mean - reference mean, its
    ``level`` interval (``low``, ``high``), the two-sided ``p``, which ``test`` gave them
    (``paired`` over ``n`` seeds, ``welch``, or ``none`` with the reason in ``note``), and
    the seeds per variant that would detect ``diff`` at 80% power (``math.inf``: more than
    :data:`MAX_SEEDS`, or no difference at all)."""

    diff: float
    low: float
    high: float
    p: float
    test: str
    n: int
    seeds_needed: float
    note: str = ""


def compare(
    variant: Mapping[str, float],
    reference: Mapping[str, float],
    level: float = 0.95,
    alpha: float = 0.05,
) -> Comparison:
    """Compare two samples keyed by seed (see :class:`Comparison`). Paired by seed when both
    have the same seeds (two or more); Welch's t-test when the seeds differ (a failed or
    missing run in one arm) and each has two or more; no test otherwise."""
    a, b = list(variant.values()), list(reference.values())
    diff = statistics.fmean(a) - statistics.fmean(b) if a and b else math.nan
    if set(variant) == set(reference) and len(a) >= 2:
        seeds = sorted(variant)
        diffs = [variant[s] - reference[s] for s in seeds]
        sd = statistics.stdev(diffs)
        if sd == 0:
            low, high, p = _degenerate(diff)
        else:
            res = stats.ttest_rel([variant[s] for s in seeds], [reference[s] for s in seeds])
            low, high, p = _interval_and_p(res, level)
        effect = _effect(diff, sd)
        needed = _seeds_for_power(effect, alpha, paired=True)
        return Comparison(diff, low, high, p, "paired", len(diffs), needed)
    if len(a) >= 2 and len(b) >= 2:
        if statistics.stdev(a) == 0 and statistics.stdev(b) == 0:
            low, high, p = _degenerate(diff)
        else:
            low, high, p = _interval_and_p(stats.ttest_ind(a, b, equal_var=False), level)
        pooled = math.sqrt((statistics.variance(a) + statistics.variance(b)) / 2)
        effect = _effect(diff, pooled)
        needed = _seeds_for_power(effect, alpha, paired=False)
        return Comparison(diff, low, high, p, "welch", min(len(a), len(b)), needed)
    fewest = min(len(a), len(b))
    note = f"{fewest} seed{'s' * (fewest != 1)} in an arm: no test"
    return Comparison(diff, math.nan, math.nan, math.nan, "none", fewest, math.nan, note)


def _effect(diff: float, sd: float) -> float:
    """Cohen's d; no spread: infinite, unless there is no difference either."""
    return abs(diff) / sd if sd else (math.inf if diff else 0.0)


def _degenerate(diff: float) -> tuple[float, float, float]:
    """No spread at all: the difference is exact (p 1 when it is zero, 0 otherwise)."""
    return diff, diff, 1.0 if diff == 0 else 0.0


def _interval_and_p(res, level: float) -> tuple[float, float, float]:
    ci = res.confidence_interval(level)
    return float(ci.low), float(ci.high), float(res.pvalue)


def t_test_power(effect: float, n: int, alpha: float, paired: bool) -> float:
    """Power of the two-sided t-test at level ``alpha`` for a standardized effect (Cohen's
    d: mean difference over the standard deviation of the differences when ``paired``, over
    the pooled standard deviation otherwise) with ``n`` seeds per variant, from the
    noncentral t distribution."""
    df = n - 1 if paired else 2 * n - 2
    noncentrality = effect * math.sqrt(n if paired else n / 2)
    crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(crit, df, noncentrality) + stats.nct.cdf(-crit, df, noncentrality))


def _seeds_for_power(effect: float, alpha: float, paired: bool) -> float:
    if effect == 0 or math.isnan(effect):
        return math.inf
    if math.isinf(effect):
        return 2
    for n in range(2, MAX_SEEDS + 1):
        if t_test_power(effect, n, alpha, paired) >= POWER:
            return n
    return math.inf


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values tested together (NaN: not tested, kept NaN
    and not counted)."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


def verdict(comparison: Comparison, p_adjusted: float, alpha: float) -> str:
    """``better``, ``worse`` or ``no detectable difference at n seeds`` at level ``alpha``
    (on the corrected p-value); without a test, why there is none."""
    if comparison.test == "none":
        return comparison.note
    if p_adjusted <= alpha:
        return "better" if comparison.diff > 0 else "worse"
    return f"no detectable difference at {comparison.n} seeds"
