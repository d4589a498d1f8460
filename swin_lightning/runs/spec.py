"""Ablation specs: variants by hand and by grid, seeds, and where the runs are launched.

A spec is a typed structure (:class:`AblationSpec`, validated by jsonargparse), so a wrong
key or value is one error naming the spec file and the key::

    experiment: table4         # folder under logs/
    reference: shift=true,pos_rel
    seeds: [0, 1, 2]
    args: []                   # overrides for every run (optional)
    variants:                  # by hand: name -> overlay files and key=value overrides
      baseline: [configs/ablations/shift.yaml]
    grid:                      # the cartesian product of the axes, named after the values
      model.net.shift: [true, false]
      pos: [configs/ablations/pos_none.yaml, configs/ablations/pos_rel.yaml]
    launcher:                  # defaults for the launcher flags of `ablate`
      name: local              # local | slurm
      parallel: 2
      slurm: {partition: gpu, time_min: 240, gpus_per_node: 1}

An axis is a dotted config key with its values, or a label whose values are all overlay
files. A grid variant is named ``<key leaf>=<value>`` per key axis and ``<file stem>`` per
overlay axis, joined by commas: ``shift=false,pos_rel``.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

OVERLAY_SUFFIXES = (".yaml", ".yml")


def _is_overlay(item: Any) -> bool:
    return isinstance(item, str) and item.endswith(OVERLAY_SUFFIXES)


@dataclass
class SlurmSettings:
    """SLURM resources of each run (one array task per run), as ``sbatch`` takes them.

    Args:
        partition: Partition (``--partition``); the cluster's default when unset.
        time_min: Time limit per attempt, in minutes; a run that needs longer is requeued and
            resumes from its ``last.ckpt``.
        nodes: Nodes per run (Lightning's DDP spans them; ``trainer.num_nodes`` follows).
        gpus_per_node: GPUs per node; one task per GPU (``trainer.devices`` follows).
        cpus_per_task: CPUs per task (``--cpus-per-task``).
        mem_gb: Memory per node in GB (``--mem``).
        account: Account to charge (``--account``).
        qos: Quality of service (``--qos``).
        constraint: Node features (``--constraint``).
        array_parallelism: At most this many runs of the array at once (``%N``).
        max_requeues: A run is requeued at most this many times (preemption, time limit).
        signal_delay_s: SLURM signals a run this many seconds before its time limit, so it
            saves ``last.ckpt`` and requeues.
        additional_parameters: Any other sbatch option, e.g. ``{mail-type: END}``.
        setup: Shell lines run before each run (``module load ...``, ``source venv``).
    """

    partition: str | None = None
    time_min: int = 60
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    array_parallelism: int | None = None
    max_requeues: int = 3
    signal_delay_s: int = 120
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)


@dataclass
class LauncherSettings:
    """Where and how many runs at once.

    Args:
        name: ``local`` (this machine) or ``slurm`` (a job array through submitit).
        parallel: Local runs at once (1: one after another).
        gpus_per_run: GPUs each local run gets (through ``CUDA_VISIBLE_DEVICES``); default 1
            when GPUs are visible and the runs use them, 0 otherwise.
        share_gpus: Let local runs share GPUs when there are fewer than
            ``parallel * gpus_per_run``.
        slurm: The SLURM resources.
    """

    name: Literal["local", "slurm"] = "local"
    parallel: int = 1
    gpus_per_run: int | None = None
    share_gpus: bool = False
    slurm: SlurmSettings = field(default_factory=SlurmSettings)


@dataclass
class AblationSpec:
    """Variants (by hand and by grid) x seeds, the reference and the launcher defaults.

    Args:
        experiment: Folder of the experiment under the log folder.
        variants: Variant name -> overlay files and ``key=value`` overrides.
        grid: Axis (dotted config key, or a label for overlay files) -> values.
        seeds: Seeds; every variant runs once per seed.
        reference: The variant the others are compared with (default: the first).
        alpha: Significance level of the report's verdicts; its intervals are 1 - alpha.
        metric: Which val top-1 of a run the report's tests compare: ``final`` (the last
            epoch's) or ``best`` (the highest epoch's, picked on the validation set itself, so
            biased upward).
        args: Overrides for every run.
        launcher: Launcher defaults (flags of ``ablate`` override them).
    """

    experiment: str = ""
    variants: dict[str, list[str]] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    reference: str | None = None
    alpha: float = 0.05
    metric: Literal["final", "best"] = "final"
    args: list[str] = field(default_factory=list)
    launcher: LauncherSettings = field(default_factory=LauncherSettings)

    @classmethod
    def load(cls, path: str | Path) -> AblationSpec:
        """Read, validate and expand a spec file; overlay paths become absolute."""
        path = Path(path)
        spec = load_typed_spec(cls, path, name_key="experiment")
        spec.expand(path)
        return spec

    def expand(self, path: Path) -> None:
        """Resolve overlays, expand the grid into variants and check names and the reference."""
        spec_dir = path.parent
        for name, items in self.variants.items():
            self.variants[name] = [_resolve(i, spec_dir, path) for i in items]
        for name, items in expand_grid(self.grid, spec_dir, path).items():
            if name in self.variants:
                raise ValueError(f"{path}: grid variant {name!r} is also listed in 'variants'")
            self.variants[name] = items
        if not self.variants:
            raise ValueError(f"{path}: no variants; list 'variants' or give a 'grid' of axes")
        if not self.seeds:
            raise ValueError(f"{path}: 'seeds' must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"{path}: 'seeds' lists a seed twice: {self.seeds}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"{path}: alpha={self.alpha} must lie between 0 and 1 (e.g. 0.05)")
        self.reference = self.reference or next(iter(self.variants))
        if self.reference not in self.variants:
            raise ValueError(
                f"{path}: reference {self.reference!r} is not a variant; variants: "
                f"{list(self.variants)}"
            )
        for name, items in [*self.variants.items(), ("args", self.args)]:
            try:
                cli_args(items)  # every item is an overlay or a key=value
            except ValueError as err:
                where = "args" if name == "args" else f"variant {name!r}"
                raise ValueError(f"{path}: {where}: {err}") from None


class DuplicateKeyError(ValueError):
    """A YAML mapping gives one key twice."""


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (plain YAML keeps the
    last one silently: two variants of one name would drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKeyError(
                    f"{key!r} is given twice (lines {seen[key]} and {line}); "
                    "YAML would keep only the last: rename or remove one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_typed_spec(cls: type, path: str | Path, name_key: str) -> Any:
    """A YAML spec file as a ``cls`` dataclass, validated by jsonargparse; ``name_key``
    defaults to the file's stem. Any problem is one ValueError naming the file and the key."""
    from jsonargparse import ArgumentParser

    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    except DuplicateKeyError as err:
        raise ValueError(f"{path}: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a spec is a mapping of keys ({name_key}, ...)")
    raw.setdefault(name_key, path.stem)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--spec", type=cls)
    try:
        return parser.instantiate(parser.parse_object({"spec": raw})).spec
    except Exception as err:  # jsonargparse's ArgumentError, with the key in its text
        text = " ".join(str(err).replace('"spec.', '"').replace("'spec'", "the spec").split())
        valid = ", ".join(cls.__dataclass_fields__)
        raise ValueError(f"{path}: {text} (spec keys: {valid})") from None


def _resolve(item: str, spec_dir: Path, spec_path: Path) -> str:
    """An overlay path made absolute: relative to the working folder, else to the spec's
    folder or one above it (so ``configs/...`` works from any working folder)."""
    if not _is_overlay(item):
        return str(item)
    candidates = [Path(item), *(d / item for d in (spec_dir, *spec_dir.resolve().parents))]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(
            f"{spec_path}: overlay {item} not found (looked in . and {spec_dir})"
        )
    return str(found.resolve())


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def expand_grid(
    grid: dict[str, list[Any]], spec_dir: Path, spec_path: Path
) -> dict[str, list[str]]:
    """The cartesian product of the axes: variant name -> overlays and overrides."""
    if not grid:
        return {}
    axes = []
    for key, values in grid.items():
        if not values:
            raise ValueError(f"{spec_path}: grid axis {key!r} has no values")
        overlays = [_is_overlay(v) for v in values]
        if any(overlays) and not all(overlays):
            raise ValueError(
                f"{spec_path}: grid axis {key!r} mixes overlay files and values; give each "
                "its own axis"
            )
        if all(overlays):
            axis = [(Path(v).stem, _resolve(v, spec_dir, spec_path)) for v in values]
        else:
            leaf = key.split(".")[-1]
            axis = [(f"{leaf}={_value_text(v)}", f"{key}={_value_text(v)}") for v in values]
        names = [n for n, _ in axis]
        if len(set(names)) != len(names):
            raise ValueError(f"{spec_path}: grid axis {key!r} repeats a value: {values}")
        axes.append(axis)
    return {
        ",".join(name for name, _ in combo): [item for _, item in combo]
        for combo in itertools.product(*axes)
    }


def cli_args(items: list[str]) -> list[str]:
    """Overlay files -> ``--config FILE``; ``key=value`` -> ``--key=value``."""
    out = []
    for item in items:
        if _is_overlay(item):
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
        if _is_overlay(item):
            flatten("", yaml.safe_load(Path(item).read_text()) or {})
        else:
            key, _, value = item.removeprefix("--").partition("=")
            settings[key.replace(".init_args", "")] = yaml.safe_load(value)
    return settings
