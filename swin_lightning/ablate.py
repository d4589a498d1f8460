"""``python -m swin_lightning ablate --config BASE.yaml SPEC.yaml``: variants x seeds, then a report.

A spec names the variants (each a list of overlay YAML files and ``key=value`` overrides)
and the seeds::

    experiment: shift          # folder under logs/
    reference: shift           # the variant the others are compared with
    seeds: [0, 1, 2]
    args: []                   # overrides for every run (optional)
    variants:
      shift: [configs/ablations/shift.yaml]
      no_shift: [configs/ablations/no_shift.yaml]

Every variant x seed is a normal ``fit`` run in its own process, logged to
``logs/<experiment>/<variant>/seed_<n>``. A finished run (``finished.json``) is skipped, an
interrupted one resumes from its ``last.ckpt``, and a failed one is reported without stopping
the others. At the end the report (``report.md``, ``report.csv``, ``val_acc1.png``) is
written next to the runs, and each run's varied settings and results go to TensorBoard's
HParams tab.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from swin_lightning.report import read_run, write_report

FINISHED = "finished.json"


@dataclass
class AblationSpec:
    """A parsed spec: variants (name -> overlays/overrides), seeds and the reference."""

    experiment: str
    variants: dict[str, list[str]]
    seeds: list[int]
    reference: str
    args: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> AblationSpec:
        path = Path(path)
        raw = yaml.safe_load(path.read_text()) or {}
        unknown = set(raw) - {"experiment", "variants", "seeds", "reference", "args"}
        if unknown:
            raise ValueError(
                f"{path}: unknown key(s) {sorted(unknown)}; valid: experiment, variants, "
                "seeds, reference, args"
            )
        variants = raw.get("variants")
        if not isinstance(variants, dict) or not variants:
            raise ValueError(f"{path}: 'variants' must map variant names to lists of overlays")
        variants = {str(k): [str(i) for i in (v or [])] for k, v in variants.items()}
        seeds = [int(s) for s in raw.get("seeds", [0])]
        if not seeds:
            raise ValueError(f"{path}: 'seeds' must list at least one seed")
        reference = str(raw.get("reference", next(iter(variants))))
        if reference not in variants:
            raise ValueError(
                f"{path}: reference {reference!r} is not a variant; variants: {list(variants)}"
            )
        spec = cls(
            raw.get("experiment", path.stem), variants, seeds, reference, raw.get("args") or []
        )
        spec.resolve_overlays(path.parent)
        return spec

    def resolve_overlays(self, spec_dir: Path) -> None:
        """Make overlay paths absolute (relative to the working folder, else to the spec)."""
        for items in self.variants.values():
            for i, item in enumerate(items):
                if item.endswith((".yaml", ".yml")):
                    candidates = [Path(item), spec_dir / item]
                    found = next((p for p in candidates if p.is_file()), None)
                    if found is None:
                        raise FileNotFoundError(
                            f"overlay {item} not found (looked in . and {spec_dir})"
                        )
                    items[i] = str(found.resolve())


def cli_args(items: list[str]) -> list[str]:
    """Overlay files -> ``--config FILE``; ``key=value`` -> ``--key=value``."""
    out = []
    for item in items:
        if item.endswith((".yaml", ".yml")):
            out += ["--config", item]
        elif "=" in item:
            out.append(item if item.startswith("--") else f"--{item}")
        else:
            raise ValueError(f"{item!r} is neither an overlay .yaml nor a key=value override")
    return out


def varied_settings(items: list[str]) -> dict[str, Any]:
    """The settings a variant changes, as flat dotted keys (for the HParams tab)."""
    settings: dict[str, Any] = {}

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                flatten(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            settings[prefix.replace(".init_args", "")] = value

    for item in items:
        if item.endswith((".yaml", ".yml")):
            flatten("", yaml.safe_load(Path(item).read_text()) or {})
        else:
            key, _, value = item.removeprefix("--").partition("=")
            settings[key.replace(".init_args", "")] = yaml.safe_load(value)
    return settings


@dataclass
class RunOutcome:
    variant: str
    seed: int
    status: str  # "done", "skipped", "resumed", "failed"
    seconds: float = 0.0


def run_one(
    base: list[str], spec: AblationSpec, variant: str, seed: int, exp_dir: Path, extra: list[str]
) -> RunOutcome:
    run_dir = exp_dir / variant / f"seed_{seed}"
    if (run_dir / FINISHED).is_file():
        return RunOutcome(variant, seed, "skipped")
    last = run_dir / "checkpoints" / "last.ckpt"
    resume = last.is_file()
    if run_dir.exists() and not resume:
        # An attempt that died before its first checkpoint: its partial curves would mix
        # with the new ones, so drop its events (its fit.log is kept, numbered).
        for events in run_dir.glob("events.out.tfevents.*"):
            events.unlink()
        if (run_dir / "fit.log").exists():
            n = len(list(run_dir.glob("fit.log.*"))) + 1
            (run_dir / "fit.log").rename(run_dir / f"fit.log.{n}")
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "swin_lightning", "fit", *base,
        *cli_args(spec.variants[variant]), *cli_args(spec.args), *cli_args(extra),
        f"--seed_everything={seed}",
        "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
        f"--trainer.logger.init_args.save_dir={exp_dir / variant}",
        "--trainer.logger.init_args.name=",
        f"--trainer.logger.init_args.version=seed_{seed}",
        "--trainer.logger.init_args.default_hp_metric=false",
        "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    if resume:
        cmd.append(f"--ckpt_path={last}")
    start = time.perf_counter()
    with open(run_dir / "fit.log", "a") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if code != 0:
        return RunOutcome(variant, seed, "failed", seconds)
    log_hparams(run_dir, variant, seed, spec.variants[variant])
    (run_dir / FINISHED).write_text(json.dumps({"seconds": round(seconds, 1), "resumed": resume}))
    return RunOutcome(variant, seed, "resumed" if resume else "done", seconds)


def log_hparams(run_dir: Path, variant: str, seed: int, items: list[str]) -> None:
    """Write the run's varied settings and final metrics for TensorBoard's HParams tab."""
    from lightning.pytorch.loggers import TensorBoardLogger

    result = read_run(run_dir, variant, str(seed))
    if result is None:
        return
    params = {"variant": variant, "seed": seed}
    params.update({k: v for k, v in varied_settings(items).items() if not isinstance(v, list)})
    metrics = {
        "hp/best_val_acc1": result.best_val_acc1,
        "hp/final_val_acc1": result.final_val_acc1,
    }
    if result.val_loss:
        metrics["hp/final_val_loss"] = result.val_loss[-1]
    logger = TensorBoardLogger(
        save_dir=str(run_dir.parent), name="", version=run_dir.name, default_hp_metric=False
    )
    logger.log_hyperparams(params, metrics)
    logger.finalize("success")


def run_ablation(
    base_configs: list[str],
    spec_path: str,
    log_dir: str = "logs",
    overrides: list[str] | None = None,
    seeds: list[int] | None = None,
) -> tuple[Path, list[RunOutcome]]:
    """Run every variant x seed (skipping finished runs), then write the report."""
    spec = AblationSpec.load(spec_path)
    if seeds:
        spec.seeds = seeds
    for config in base_configs:
        if not Path(config).is_file():
            raise FileNotFoundError(f"base config {config} not found")
    base = [a for c in base_configs for a in ("--config", c)]
    exp_dir = Path(log_dir) / spec.experiment
    outcomes = []
    for seed in spec.seeds:
        for variant in spec.variants:
            outcome = run_one(base, spec, variant, seed, exp_dir, overrides or [])
            print(
                f"[ablate] {variant} seed {seed}: {outcome.status} ({outcome.seconds:.0f} s)",
                flush=True,
            )
            outcomes.append(outcome)
    failed: dict[str, list[str]] = {}
    for o in outcomes:
        if o.status == "failed":
            failed.setdefault(o.variant, []).append(str(o.seed))
    try:
        write_report(exp_dir, spec.reference, list(spec.variants), failed)
        print(f"[ablate] report: {exp_dir / 'report.md'}", flush=True)
    except FileNotFoundError as err:
        print(f"[ablate] no report: {err}", file=sys.stderr)
    return exp_dir, outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m swin_lightning ablate",
        description="Run an ablation (variants x seeds, each a fit run) and write its report.",
    )
    parser.add_argument("--config", action="append", required=True,
                        help="base config (repeat to compose overlays)")  # fmt: skip
    parser.add_argument("spec", help="ablation spec YAML (variants, seeds, reference)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    parser.add_argument("--log_dir", default="logs", help="root folder of the experiment")
    parser.add_argument(
        "--seeds",
        type=lambda v: [int(s) for s in v.split(",")],
        help="replace the spec's seeds, e.g. 0,1",
    )
    args = parser.parse_intermixed_args(argv)
    _, outcomes = run_ablation(args.config, args.spec, args.log_dir, args.overrides, args.seeds)
    failures = [o for o in outcomes if o.status == "failed"]
    for o in failures:
        print(f"[ablate] FAILED: {o.variant} seed {o.seed}", file=sys.stderr)
    return 1 if failures else 0
