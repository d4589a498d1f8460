"""A study's report: its trials (state, value, epochs reached, parameters) as a table and
``report.md`` with the optimisation history and parameter importances, and ``best.yaml``,
the best trial's settings as an overlay. Read from the study's folder (``study.json``, the
Optuna storage and the trials' run folders)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from swin_lightning.runs.pruning import open_storage
from swin_lightning.runs.store import Run, read_json, read_status
from swin_lightning.storage import save_figure, write_text

MANIFEST = "study.json"  # what tune writes into the study folder: study, storage, base, space
REPEAT = "repeat_of"  # user attribute of a draw of a tried point: closed unrun, never reported


def load_study(study_dir: Path) -> tuple[dict[str, Any], Any]:
    import optuna

    manifest = read_json(study_dir / MANIFEST)
    if not manifest:
        raise FileNotFoundError(f"{study_dir / MANIFEST} not found: {study_dir} is not a study "
                                "folder that `tune` made")  # fmt: skip
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name=manifest["study"], storage=open_storage(manifest["storage"])
    )
    return manifest, study


def trial_rows(study_dir: Path, manifest: dict[str, Any], study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if REPEAT in t.user_attrs:
            continue
        state = t.state.name.lower()
        run_dir = study_dir / f"trial_{t.number}"
        run = Run(f"trial_{t.number}", 0, "", run_dir)
        status = read_status(run) if run_dir.is_dir() else None
        if state == "running" and status is not None and status.state != "running":
            state = "interrupted"  # its process is gone; a re-run resumes it
        rows.append({"trial": t.number, "state": state, "value": t.value, "params": t.params,
                     "epoch": status.epoch if status else None})  # fmt: skip
    return rows


def best_overlay(manifest: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Everything a trial adds to the base configs (the spec's args, the overrides and its
    parameters), as one YAML overlay."""
    merged: dict[str, Any] = {}

    def merge(into: dict[str, Any], new: dict[str, Any]) -> None:
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v)
            else:
                into[k] = v

    base = manifest["base"]
    overrides = [a for a in base if a.startswith("--") and "=" in a]
    items = [*overrides, *(str(params[k]) if k in manifest["overlays"] else f"--{k}={params[k]}"
                           for k in params)]  # fmt: skip
    for item in items:
        if item.endswith((".yaml", ".yml")):
            merge(merged, yaml.safe_load(Path(item).read_text()) or {})
            continue
        key, _, value = item.removeprefix("--").partition("=")
        node: dict[str, Any] = {}
        leaf = node
        parts = key.split(".")
        for part in parts[:-1]:
            leaf = leaf.setdefault(part, {})
        leaf[parts[-1]] = yaml.safe_load(value) if isinstance(value, str) else value
        merge(merged, node)
    return merged


def write_study_report(study_dir: Path) -> Path:
    manifest, study = load_study(study_dir)
    rows = trial_rows(study_dir, manifest, study)
    done = [r for r in rows if r["state"] == "complete"]
    if not done:
        raise FileNotFoundError(f"{study_dir}: no complete trial yet")
    best = study.best_trial
    overlay = best_overlay(manifest, best.params)
    write_text(study_dir / "best.yaml",
               f"# Best trial {best.number} of study {manifest['study']}: {manifest['metric']} "
               f"{best.value:.4f}. Use: fit --config BASE --config {study_dir / 'best.yaml'}\n"
               + yaml.safe_dump(overlay, sort_keys=False))  # fmt: skip
    keys = manifest["space"]
    text = f"# Study {manifest['study']}\n\nBest: trial {best.number}, {manifest['metric']} "
    text += f"{best.value:.4f} ({manifest['direction']}); its settings: `best.yaml`.\n\n"
    text += "| trial | state | " + manifest["metric"] + " | epochs | " + " | ".join(keys) + " |\n"
    text += "|---" * (4 + len(keys)) + "|\n"
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:.4f}"
        params = [_short(r["params"].get(k)) for k in keys]
        text += f"| {r['trial']} | {r['state']} | {value} | {r['epoch'] or '-'} | {' | '.join(params)} |\n"
    counts = {s: sum(r["state"] == s for r in rows) for s in {r["state"] for r in rows}}
    text += (
        f"\n{len(rows)} trials of {manifest['n_trials']}: "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + "\n"
    )
    text += "\n![history](history.png)\n"
    _plots(study, study_dir, len(done))
    if (study_dir / "importance.png").is_file():
        text += "\n![importance](importance.png)\n"
    write_text(study_dir / "report.md", text)
    return study_dir / "report.md"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, str) and value.endswith((".yaml", ".yml")):
        return Path(value).stem
    return "-" if value is None else str(value)


def _plots(study: Any, study_dir: Path, complete: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization import matplotlib as ovm

    ax = ovm.plot_optimization_history(study)
    save_figure(ax.figure, study_dir / "history.png")
    plt.close(ax.figure)
    if complete >= 3 and len(study.best_trial.params) > 1:
        try:
            ax = ovm.plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
        except (ValueError, RuntimeError):
            return  # too few distinct trials for importances
        save_figure(ax.figure, study_dir / "importance.png")
        plt.close(ax.figure)


def print_status(study_dir: Path) -> None:
    """The trials of a study as a table, and how many are in each state."""
    manifest, study = load_study(study_dir)
    rows = trial_rows(study_dir, manifest, study)
    table = [["trial", "state", manifest["metric"], "epoch", *manifest["space"]]]
    for r in rows:
        table.append([str(r["trial"]), r["state"], "-" if r["value"] is None else f"{r['value']:.4f}",
                      str(r["epoch"] or "-"), *(_short(r["params"].get(k)) for k in manifest["space"])])  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    counts = {s: sum(r["state"] == s for r in rows) for s in {r["state"] for r in rows}}
    print(f"\n{study_dir}: {len(rows)} of {manifest['n_trials']} trials: "
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))  # fmt: skip
