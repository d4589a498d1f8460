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
``logs/<experiment>/<variant>/<settings>/seed_<n>``, where ``<settings>`` is a fingerprint of
the run's resolved config (all settings but the seed and where it writes): re-running with
other settings trains new runs beside the old ones and never reports the old ones as theirs.
A finished run (``finished.json`` with the same fingerprint) is skipped, an interrupted one
resumes from its ``last.ckpt``, a failed one is reported without stopping the others, and a
run another process holds (its lock) is left to that process. Each run is locked, in its own
process group, and dies with ``ablate``: SIGINT/SIGTERM are forwarded, the run saves its
``last.ckpt``, and ``ablate`` stops saying how to resume. At the end the report
(``report.md``, ``report.csv``, ``val_acc1.png``) is written next to the runs, and each
run's varied settings and results go to TensorBoard's HParams tab.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from swin_lightning.report import FINISHED, SETTINGS, read_run, write_report
from swin_lightning.storage import RunBusyError, RunLock, WriteError, write_text


class AblationInterrupted(Exception):
    """SIGINT or SIGTERM stopped the ablation (the running run saved its last.ckpt)."""

    def __init__(self, signum: int, outcomes: list[RunOutcome]):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.outcomes = outcomes


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
    status: str  # "done", "skipped", "resumed", "failed", "busy", "interrupted"
    seconds: float = 0.0
    run_dir: Path | None = None
    message: str = ""


def fingerprint(settings: dict[str, Any]) -> str:
    """A short hash of resolved settings (canonical JSON)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def finished_fingerprint(run_dir: Path) -> str | None:
    """The fingerprint a finished run recorded, or None (not finished, or unreadable)."""
    try:
        return json.loads((run_dir / FINISHED).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


class SignalForwarder:
    """While installed: SIGINT and SIGTERM go to the running child's process group, and the
    first one received is remembered, so the loop stops after the child has saved."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.child: subprocess.Popen | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalForwarder:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._forward)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _forward(self, signum: int, frame: Any) -> None:
        self.received = self.received or signum
        if self.child is not None and self.child.poll() is None:
            os.killpg(self.child.pid, signum)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when ablate dies, even by SIGKILL (Linux)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


def run_one(
    base: list[str],
    spec: AblationSpec,
    variant: str,
    seed: int,
    exp_dir: Path,
    extra: list[str],
    forwarder: SignalForwarder | None = None,
) -> RunOutcome:
    from swin_lightning.cli import resolved_settings

    settings_args = [*base, *cli_args(spec.variants[variant]), *cli_args(spec.args),
                     *cli_args(extra)]  # fmt: skip
    try:
        settings = resolved_settings(settings_args)
    except (ValueError, OSError) as err:
        return RunOutcome(variant, seed, "failed", message=f"settings rejected: {err}")
    fp = fingerprint(settings)
    run_dir = exp_dir / variant / fp / f"seed_{seed}"
    try:
        lock = RunLock(run_dir).acquire()
    except RunBusyError as err:
        return RunOutcome(variant, seed, "busy", run_dir=run_dir, message=str(err))
    try:
        if finished_fingerprint(run_dir) == fp:
            return RunOutcome(variant, seed, "skipped", run_dir=run_dir)
        if not (run_dir.parent / SETTINGS).is_file():
            write_text(run_dir.parent / SETTINGS, yaml.safe_dump(settings, sort_keys=False))
        return _train(settings_args, seed, run_dir, lock, fp, spec.variants[variant], forwarder)
    finally:
        lock.release()


def _train(
    settings_args: list[str],
    seed: int,
    run_dir: Path,
    lock: RunLock,
    fp: str,
    items: list[str],
    forwarder: SignalForwarder | None,
) -> RunOutcome:
    variant = run_dir.parent.parent.name
    last = run_dir / "checkpoints" / "last.ckpt"
    resume = last.is_file()
    if not resume:
        # An attempt that died before its first checkpoint: its partial curves would mix
        # with the new ones, so drop its events (its fit.log is kept, numbered).
        for events in run_dir.glob("events.out.tfevents.*"):
            events.unlink()
        if (run_dir / "fit.log").exists():
            n = len(list(run_dir.glob("fit.log.*"))) + 1
            (run_dir / "fit.log").rename(run_dir / f"fit.log.{n}")
    cmd = [
        sys.executable, "-m", "swin_lightning", "fit", *settings_args,
        f"--seed_everything={seed}",
        "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
        f"--trainer.logger.init_args.save_dir={run_dir.parent}",
        "--trainer.logger.init_args.name=",
        f"--trainer.logger.init_args.version={run_dir.name}",
        "--trainer.logger.init_args.default_hp_metric=false",
        "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    if resume:
        cmd.append(f"--ckpt_path={last}")
    start = time.perf_counter()
    with open(run_dir / "fit.log", "a") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        # Its own process group (a Ctrl+C reaches it through ablate, once), the run's lock
        # handed down (held until both have exited), and it dies with ablate.
        child = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            pass_fds=[lock.fd], env={**os.environ, **lock.env()}, preexec_fn=_die_with_parent,
        )  # fmt: skip
        if forwarder is not None:
            forwarder.child = child
        try:
            code = child.wait()
        finally:
            if forwarder is not None:
                forwarder.child = None
    seconds = time.perf_counter() - start
    if code in (130, 143, -signal.SIGINT, -signal.SIGTERM):
        saved = f"its last.ckpt is {last}" if last.is_file() else "it had saved no checkpoint"
        return RunOutcome(variant, seed, "interrupted", seconds, run_dir, saved)
    if code != 0:
        return RunOutcome(variant, seed, "failed", seconds, run_dir, f"exit code {code}")
    log_hparams(run_dir, variant, seed, items)
    record = {"seconds": round(seconds, 1), "resumed": resume, "fingerprint": fp, "seed": seed}
    write_text(run_dir / FINISHED, json.dumps(record))
    return RunOutcome(variant, seed, "resumed" if resume else "done", seconds, run_dir)


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
    """Run every variant x seed (skipping finished runs), then write the report. A SIGINT or
    SIGTERM stops after the running run has saved (:class:`AblationInterrupted`, no report);
    the rest are left for a re-run."""
    spec = AblationSpec.load(spec_path)
    if seeds:
        spec.seeds = seeds
    for config in base_configs:
        if not Path(config).is_file():
            raise FileNotFoundError(f"base config {config} not found")
    base = [a for c in base_configs for a in ("--config", c)]
    exp_dir = Path(log_dir) / spec.experiment
    outcomes: list[RunOutcome] = []
    with SignalForwarder() as forwarder:
        for seed in spec.seeds:
            for variant in spec.variants:
                o = run_one(base, spec, variant, seed, exp_dir, overrides or [], forwarder)
                note = f": {o.message}" if o.message else ""
                print(f"[ablate] {variant} seed {seed}: {o.status} ({o.seconds:.0f} s){note}",
                      flush=True)  # fmt: skip
                outcomes.append(o)
                if forwarder.received:
                    break
            if forwarder.received:
                break
    if forwarder.received:
        name = signal.Signals(forwarder.received).name
        print(
            f"[ablate] stopped by {name}: {len(outcomes)} of "
            f"{len(spec.seeds) * len(spec.variants)} runs reached; run the same command again "
            "to resume (finished runs are skipped, the interrupted one resumes from its "
            "last.ckpt)",
            file=sys.stderr,
            flush=True,
        )
        raise AblationInterrupted(forwarder.received, outcomes)
    failed: dict[str, list[str]] = {}
    for o in outcomes:
        if o.status in ("failed", "busy"):
            failed.setdefault(o.variant, []).append(str(o.seed))
    current = {}
    for o in outcomes:
        if o.run_dir is not None and o.status in ("done", "resumed", "skipped"):
            current.setdefault(o.variant, []).append(o.run_dir)
    try:
        write_report(exp_dir, spec.reference, list(spec.variants), failed, current)
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
    try:
        _, outcomes = run_ablation(args.config, args.spec, args.log_dir, args.overrides,
                                   args.seeds)  # fmt: skip
    except AblationInterrupted as stop:
        return 128 + stop.signum
    except (OSError, ValueError) as err:  # a missing or broken spec or config, a failed write
        print(f"error: {err}", file=sys.stderr)
        return 1 if isinstance(err, WriteError) else 2
    for o in outcomes:
        if o.status == "failed":
            print(f"[ablate] FAILED: {o.variant} seed {o.seed}", file=sys.stderr)
        if o.status == "busy":
            print(f"[ablate] NOT RUN: {o.variant} seed {o.seed}: {o.message}", file=sys.stderr)
    return 1 if any(o.status in ("failed", "busy") for o in outcomes) else 0
