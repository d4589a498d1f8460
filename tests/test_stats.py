"""The ablation report's statistics against published figures, and its edge cases."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from swin_lightning.ablate import main
from swin_lightning.report import summary_lines, write_comparison, write_report
from swin_lightning.stats import compare, holm, mean_interval, t_test_power, verdict

# Student's sleep data (Cushny and Peebles, 1905; R's `sleep`): extra hours of sleep of ten
# patients under two drugs. R 4.x: t.test(extra ~ group, paired = TRUE) gives a mean difference
# of 1.58 (group 2 - group 1), 95% CI [0.7001142, 2.4598858], p = 0.002833; the unpaired Welch
# t.test(extra ~ group) gives 95% CI [-0.2054832, 3.3654832], p = 0.07939.
DRUG_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
DRUG_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def by_seed(values: list[float], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{i}": v for i, v in enumerate(values)}


def test_paired_t_matches_the_textbook_sleep_example():
    c = compare(by_seed(DRUG_2), by_seed(DRUG_1))
    assert c.test == "paired" and c.n == 10
    assert c.diff == pytest.approx(1.58)
    assert (c.low, c.high) == pytest.approx((0.7001142, 2.4598858), abs=1e-6)
    assert c.p == pytest.approx(0.002833, abs=1e-6)


def test_welch_t_matches_the_textbook_sleep_example_when_the_seeds_differ():
    c = compare(by_seed(DRUG_2, "a"), by_seed(DRUG_1, "b"))
    assert c.test == "welch" and c.n == 10
    assert (c.low, c.high) == pytest.approx((-0.2054832, 3.3654832), abs=1e-6)
    assert c.p == pytest.approx(0.07939, abs=1e-5)


def test_student_t_interval_of_a_mean():
    # mean 2.5, sd 1.290994, t(0.975, 3) = 3.182446: 2.5 +- 3.182446 * 1.290994 / 2
    i = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert (i.mean, i.std, i.n) == pytest.approx((2.5, 1.2909944, 4))
    assert (i.low, i.high) == pytest.approx((0.4457397, 4.5542603), abs=1e-6)


def test_power_and_seeds_needed_match_r_power_t_test():
    # R: power.t.test(n = 10, delta = 1, sd = 1, type = "paired") -> power 0.8030962;
    # power.t.test(delta = 1, sd = 1, power = 0.8) -> n = 16.71477 per group.
    assert t_test_power(1.0, 10, 0.05, paired=True) == pytest.approx(0.8030962, abs=1e-4)
    assert t_test_power(1.0, 16, 0.05, paired=False) < 0.8 <= t_test_power(1, 17, 0.05, False)
    # Paired differences with mean 1 and sd 2/sqrt(3) (effect size 0.866): the smallest seed
    # count whose power reaches 80%.
    diffs = [0.0, 2.0, 0.0, 2.0]
    c = compare({str(i): 5 + d for i, d in enumerate(diffs)}, {str(i): 5.0 for i in range(4)})
    effect = 1 / mean_interval(diffs).std
    n = c.seeds_needed
    assert t_test_power(effect, n - 1, 0.05, True) < 0.8 <= t_test_power(effect, n, 0.05, True)


def test_holm_matches_r_p_adjust():
    # R: p.adjust(c(0.01, 0.04, 0.03, 0.005), "holm") -> 0.03 0.06 0.06 0.02
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.02, math.nan])  # an untested variant does not count
    assert adjusted[0] == 0.02 and math.isnan(adjusted[1])


def test_one_seed_gives_no_interval_and_no_test():
    i = mean_interval([0.7])
    assert i.mean == 0.7 and all(math.isnan(x) for x in (i.std, i.low, i.high))
    c = compare({"0": 0.7}, {"0": 0.6})
    assert c.test == "none" and math.isnan(c.p) and math.isnan(c.low)
    assert c.diff == pytest.approx(0.1)
    assert verdict(c, math.nan, 0.05) == "1 seed in an arm: no test"


def test_identical_values_are_no_difference_not_a_division_by_zero():
    same = {"0": 0.5, "1": 0.5, "2": 0.5}
    c = compare(same, dict(same))
    assert (c.diff, c.low, c.high, c.p) == (0.0, 0.0, 0.0, 1.0)
    assert math.isinf(c.seeds_needed)
    assert verdict(c, 1.0, 0.05) == "no detectable difference at 3 seeds"
    assert mean_interval([0.5, 0.5]).low == 0.5


def test_a_seed_missing_in_one_arm_falls_back_to_welch():
    c = compare({"0": 0.60, "1": 0.62, "2": 0.61}, {"0": 0.50, "1": 0.52})
    assert c.test == "welch" and c.n == 2
    assert c.low < c.diff < c.high and 0 < c.p < 0.05


# ------------------------------------------------------------------ the report itself
def fake_run(run_dir: Path, curve: list[float], wall: float = 30.0, threads: float = 2.0):
    """A finished run's event files, written by TensorBoard's own writer."""
    with SummaryWriter(str(run_dir)) as w:
        w.add_scalar("model/params", 1000, 0)
        w.add_scalar("model/gmacs", 0.01, 0)
        for epoch, acc in enumerate(curve):
            step = 10 * (epoch + 1)
            w.add_scalar("val/acc1", acc, step)
            w.add_scalar("val/loss", 1 - acc, step)
            w.add_scalar("train/loss", 1.2 - acc, step)
            w.add_scalar("train/device/samples_per_sec", 100.0, step)
            w.add_scalar("cost/wall_seconds", wall * (epoch + 1) / len(curve), step)
            w.add_scalar("cost/peak_mem_mb", 500.0 + epoch, step)
            w.add_scalar("cost/gpus", 0.0, step)
            w.add_scalar("cost/cpu_threads", threads, step)


FINALS = {"ref": [0.50, 0.52, 0.51], "better": [0.60, 0.63, 0.61], "same": [0.505, 0.515, 0.51]}


def fake_experiment(root: Path, finals: dict[str, list[float]]) -> dict[str, list[Path]]:
    runs = {}
    for variant, values in finals.items():
        for seed, final in enumerate(values):
            run = root / variant / "fp" / f"seed_{seed}"
            fake_run(run, [final - 0.1, final])
            runs.setdefault(variant, []).append(run)
    return runs


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r["variant"]: r for r in csv.DictReader(f)}


def test_report_gives_intervals_paired_tests_holm_verdicts_and_costs(tmp_path):
    exp = tmp_path / "exp"
    runs = fake_experiment(exp, FINALS)
    rows = write_report(exp, "ref", list(FINALS), run_dirs=runs)
    by = {r.variant: r for r in rows}
    better, same = by["better"].comparison, by["same"].comparison
    assert better.test == same.test == "paired"
    want = compare(by_seed(FINALS["better"]), by_seed(FINALS["ref"]))
    # event files store float32: the same test on the float32 values
    assert better.p == pytest.approx(want.p, rel=1e-4) and better.low == pytest.approx(
        want.low, rel=1e-4
    )
    assert by["better"].p_holm == pytest.approx(holm([better.p, same.p])[0])
    assert by["better"].verdict == "better"
    assert by["same"].verdict == "no detectable difference at 3 seeds"
    lines = summary_lines(rows)  # what `ablate` prints
    assert lines[0].startswith("ref: final val top-1 51.0 +- 1.0 [") and "(reference)" in lines[0]
    assert lines[1].startswith("better: final val top-1 61.3 +- 1.5 [")
    assert f"paired t-test p (Holm) {by['better'].p_holm:.3f}: better" in lines[1]
    text = (exp / "report.md").read_text()
    assert "| ref | 3 |" in text and "| better | 3 |" in text and "reference" in text
    assert f"| +{100 * better.diff:.1f} [{100 * better.low:+.1f}, {100 * better.high:+.1f}]" in text
    assert "Holm" in text and "80% power" in text
    # cost: 30 s per run on 2 threads, 3 runs: 3 * 30 * 2 / 3600 CPU-hours per variant
    assert by["ref"].wall_seconds == pytest.approx(30.0)
    assert by["ref"].compute_hours == pytest.approx(0.05) and by["ref"].peak_mem_mb == 501
    assert "| **total** | | | | | | **0.150 CPU-h** |" in text
    row = read_csv(exp / "report.csv")["better"]
    assert row["verdict"] == "better" and row["test"] == "paired" and row["metric"] == "final"
    assert float(row["p_holm"]) == pytest.approx(by["better"].p_holm)
    assert float(row["final_val_acc1_ci_low"]) == pytest.approx(by["better"].final.low)
    # TensorBoard's TEXT tab holds the same report, replaced (not added to) on a re-run
    write_report(exp, "ref", list(FINALS), run_dirs=runs, alpha=0.01)
    assert len(list((exp / "report").glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(exp / "report"))
    acc.Reload()
    (event,) = acc.Tensors("ablation_report/text_summary")
    assert "99% Student-t interval" in event.tensor_proto.string_val[0].decode()


def test_report_with_a_failed_run_and_a_single_seed_variant(tmp_path):
    exp = tmp_path / "exp"
    runs = fake_experiment(exp, {"ref": [0.5, 0.52, 0.51], "partial": [0.6, 0.62], "one": [0.7]})
    rows = write_report(exp, "ref", ["ref", "partial", "one"], failed={"partial": ["2"]},
                        run_dirs=runs)  # fmt: skip
    by = {r.variant: r for r in rows}
    assert by["partial"].comparison.test == "welch"
    assert by["one"].comparison.test == "none" and by["one"].verdict.startswith("1 seed")
    # Holm counts only the tested comparison: its p stays as it is
    assert by["partial"].p_holm == by["partial"].comparison.p
    text = (exp / "report.md").read_text()
    assert "| one | 1 | 70.0 (1 seed: no interval) | 70.0 (1 seed: no interval) |" in text
    assert "**partial failed** for seed(s) 2" in text


def test_compare_puts_two_experiments_in_one_table(tmp_path, capsys):
    """`ablate report A --compare B` on two experiments that `ablate` launched: one table,
    each variant against its own experiment's reference."""
    from swin_lightning.runs.store import Experiment, Run

    experiments = {}
    for name, gap in (("short", 0.02), ("long", 0.10)):
        exp = tmp_path / name
        finals = {"shift": [0.6, 0.62, 0.61], "no_shift": [0.6 - gap, 0.62 - gap, 0.61 - gap]}
        runs = fake_experiment(exp, finals)
        listed = [Run(v, s, "fp", exp / v / "fp" / f"seed_{s}", [], [], "cpu")
                  for v in finals for s in range(3)]  # fmt: skip
        for run in listed:
            (run.dir / "finished.json").write_text('{"fingerprint": "fp"}')
        Experiment(exp, "shift", list(finals), listed).save()
        experiments[name] = runs
    assert main(["report", "short", "--log_dir", str(tmp_path), "--compare", "long"]) == 0
    out = tmp_path / "short" / "compare_long.md"
    assert str(out) in capsys.readouterr().out
    rows = read_csv(out.with_suffix(".csv"))
    assert set(rows) == {"short/shift", "short/no_shift", "long/shift", "long/no_shift"}
    assert float(rows["long/no_shift"]["delta"]) == pytest.approx(-0.10, abs=1e-6)
    assert float(rows["short/no_shift"]["delta"]) == pytest.approx(-0.02, abs=1e-6)
    assert rows["long/no_shift"]["verdict"] == "worse"
    assert rows["long/shift"]["verdict"] == "reference"
    # the same through the function, with a stricter level
    table = [(tmp_path / n, "shift", ["shift", "no_shift"], r) for n, r in experiments.items()]
    text = write_comparison(table, alpha=0.001).read_text()
    assert "99.9% CI" in text


def test_report_flags_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path), "--metric", "worst"])
    assert exit_.value.code == 2
    assert "invalid choice: 'worst'" in capsys.readouterr().err
