"""Search specs for ``tune``: the study, its metric, sampler, pruner, storage and space.

::

    study: demo_search          # folder under logs/, and the Optuna study's name
    metric: val/acc1            # best value over the epochs of a trial
    direction: maximize
    n_trials: 12
    sampler: tpe                # tpe | random | grid | cmaes
    pruner: median              # median | hyperband | none
    seed: 0                     # the sampler's seed and every trial's seed_everything
    storage: null               # null: sqlite <log_dir>/<study>/study.db; journal: a journal
                                # file there (cluster file systems); or any Optuna storage URL
    args: []                    # overrides for every trial
    space:
      model.optimizer.init_args.lr: {type: float, low: 1.0e-4, high: 0.1, log: true}
      model.net.init_args.window_size: {type: categorical, choices: [4, 8]}
      shift: {type: categorical, choices: [configs/ablations/shift.yaml,
                                           configs/ablations/no_shift.yaml]}

A parameter is a dotted config key, or a label whose choices are all overlay files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from swin_lightning.runs.spec import LauncherSettings, _is_overlay, _resolve, load_typed_spec


@dataclass
class Param:
    """One dimension of the space.

    Args:
        type: ``float``, ``int`` or ``categorical``.
        low: Lower bound (float, int).
        high: Upper bound (float, int).
        log: Sample on a log scale (float, int).
        step: Grid step (float, int; optional).
        choices: The values (categorical), or overlay files.
    """

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None


@dataclass
class SearchSpec:
    """A hyperparameter search over ``fit`` runs.

    Args:
        study: Study name and its folder under the log folder.
        space: Config key (or overlay label) -> :class:`Param`.
        metric: Logged metric a trial is judged by (its best epoch).
        direction: ``maximize`` or ``minimize`` the metric.
        n_trials: Trials in the study, counted over every worker and re-run.
        sampler: Optuna sampler: ``tpe``, ``random``, ``grid`` or ``cmaes``.
        pruner: Optuna pruner on the per-epoch metric: ``median``, ``hyperband`` or ``none``.
        seed: Seed of every trial's run, and with the study name and the trial's number
            the seed of the sampler for that trial (a re-run continues, never repeats).
        storage: Optuna storage: None (SQLite in the study folder), ``journal`` (a journal
            file there, for cluster file systems) or a storage URL.
        args: Overrides for every trial.
        launcher: Launcher defaults (flags of ``tune`` override them).
    """

    study: str = ""
    space: dict[str, Param] = field(default_factory=dict)
    metric: str = "val/acc1"
    direction: Literal["maximize", "minimize"] = "maximize"
    n_trials: int = 10
    sampler: Literal["tpe", "random", "grid", "cmaes"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    seed: int = 0
    storage: str | None = None
    args: list[str] = field(default_factory=list)
    launcher: LauncherSettings = field(default_factory=LauncherSettings)

    @classmethod
    def load(cls, path: str | Path) -> SearchSpec:
        """Read and validate a search spec; overlay choices become absolute paths."""
        path = Path(path)
        spec = load_typed_spec(cls, path, name_key="study")
        spec.check(path)
        return spec

    def check(self, path: Path) -> None:
        if not self.space:
            raise ValueError(f"{path}: 'space' is empty; give at least one parameter")
        if self.n_trials < 1:
            raise ValueError(f"{path}: n_trials={self.n_trials} must be >= 1")
        for key, p in self.space.items():
            where = f"{path}: space.{key}"
            if p.type == "categorical":
                if not p.choices:
                    raise ValueError(f"{where}: a categorical parameter needs 'choices'")
                overlays = [_is_overlay(c) for c in p.choices]
                if any(overlays) and not all(overlays):
                    raise ValueError(f"{where}: mixes overlay files and values")
                if all(overlays):
                    p.choices = [_resolve(c, path.parent, path) for c in p.choices]
                same = [(a, b) for i, a in enumerate(p.choices) for b in p.choices[i + 1 :]
                        if a == b]  # fmt: skip
                if same:
                    raise ValueError(f"{where}: choices {same[0][0]!r} and {same[0][1]!r} are "
                                     "the same value: list each once")  # fmt: skip
                continue
            if p.low is None or p.high is None or not p.low < p.high:
                raise ValueError(f"{where}: a {p.type} parameter needs low < high "
                                 f"(got low={p.low}, high={p.high})")  # fmt: skip
            if p.log and p.low <= 0:
                raise ValueError(f"{where}: log=true needs low > 0 (got {p.low})")
            if self.sampler == "grid":
                raise ValueError(f"{where}: the grid sampler needs categorical choices")

    def is_overlay(self, key: str) -> bool:
        p = self.space[key]
        return p.type == "categorical" and all(_is_overlay(c) for c in p.choices or [])

    def items(self, params: dict[str, Any]) -> list[str]:
        """A trial's parameters as overlays and ``key=value`` overrides."""
        out = []
        for key, value in params.items():
            if self.is_overlay(key):
                out.append(str(value))
            else:
                out.append(
                    f"{key}={value if isinstance(value, str) else yaml.safe_dump(value).splitlines()[0]}"
                )
        return out
