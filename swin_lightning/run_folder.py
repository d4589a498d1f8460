"""A run's folder: ``--ckpt_path last|auto`` resolved to a checkpoint (checked to be intact,
the logger pinned to the resumed run's folder) by :func:`resolve_resume`, and a new run given
its own ``version_<n>`` folder, locked for this process, by :func:`claim_run_folder`."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from swin_lightning.protocol import CHECKPOINTS, LAST_CKPT
from swin_lightning.storage import (
    RunLock,
    WriteError,
    load_checkpoint,
    remove_stale_tmp,
)


def _version_key(path: Path) -> tuple[float, int]:
    match = re.fullmatch(r"version_(\d+)", path.parent.parent.name)
    return path.stat().st_mtime, int(match.group(1)) if match else -1


def _logger_args(config: Any) -> Any | None:
    """The ``init_args`` of the first logger with save_dir, name and version (TensorBoard, CSV)."""
    loggers = config.trainer.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    for logger in loggers:
        args = getattr(logger, "init_args", None) if hasattr(logger, "class_path") else None
        if args is not None and {"save_dir", "name", "version"} <= set(vars(args)):
            return args
    return None


def _run_dir_name(version: int | str) -> str:
    return version if isinstance(version, str) else f"version_{version}"


def resolve_resume(config: Any, subcommand: str) -> Path | None:
    """Resolve ``ckpt_path`` ``last``/``auto`` and pin the logger to the resumed run's folder.

    ``last``: the newest ``checkpoints/last.ckpt`` (by modification time) among this
    experiment's runs (``<save_dir>/<name>/*``, or the pinned ``version``); an error if there
    is none. ``auto``: the same, or a fresh run when there is none. For ``fit``, a checkpoint
    that is a run's ``last.ckpt`` inside this experiment (found or given as a path) makes the
    logger write into that run's folder; TensorBoard hides the steps logged after the
    checkpoint (``purge_step``), which are trained again. Returns the checkpoint or None.
    """
    requested = config.get("ckpt_path")
    if requested is None:
        return None
    logger = _logger_args(config)
    root = Path(logger.save_dir) / (logger.name or "") if logger is not None else None
    dirpath = config.get("checkpoint", {}).get("dirpath") if "checkpoint" in config else None
    ckpt: Path | None
    if str(requested) in ("last", "auto"):
        if dirpath:
            runs = [Path(dirpath).parent]
        elif root is None:
            runs = [Path(config.trainer.get("default_root_dir") or ".")]
        elif logger.version is not None:
            runs = [root / _run_dir_name(logger.version)]
        else:
            runs = sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []
        found = [
            r / CHECKPOINTS / LAST_CKPT for r in runs if (r / CHECKPOINTS / LAST_CKPT).exists()
        ]
        if dirpath:
            found = [Path(dirpath) / LAST_CKPT] if (Path(dirpath) / LAST_CKPT).exists() else []
        if not found:
            if str(requested) == "auto":
                config.ckpt_path = None
                return None
            where = Path(dirpath) if dirpath else (root or Path(".")) / "*" / CHECKPOINTS
            raise ValueError(
                f"--ckpt_path last: no {LAST_CKPT} under {where}. Start a new run without "
                "--ckpt_path, pass a checkpoint file, or use --ckpt_path auto (resume when "
                "there is a checkpoint, start fresh otherwise)."
            )
        ckpt = max(found, key=_version_key)
        config.ckpt_path = str(ckpt)
    else:
        ckpt = Path(str(requested))
    # A damaged, truncated or foreign file stops here, naming the newest intact checkpoint.
    step = int(load_checkpoint(ckpt, mmap=True)["global_step"])
    if subcommand != "fit" or logger is None or root is None:
        return ckpt
    run = ckpt.resolve().parent.parent
    is_last = re.fullmatch(r"last(-v\d+)?\.ckpt", ckpt.name) is not None
    if ckpt.parent.name == CHECKPOINTS and run.parent == root.resolve() and is_last:
        if logger.version is None:
            logger.version = run.name
        if _run_dir_name(logger.version) == run.name:
            logger.purge_step = step
            print(f"Resuming {ckpt} (step {step}), logging into {run}", file=sys.stderr)
    return ckpt


def claim_run_folder(config: Any, subcommand: str) -> RunLock | None:
    """Give this process its run folder: a new run gets a fresh ``version_<n>`` (created
    atomically, so two runs started at once never share one), and the folder is locked
    (:class:`~swin_lightning.storage.RunLock`) until the process ends. A ``fit`` without
    ``--ckpt_path`` into a folder that already holds checkpoints is refused: it would
    overwrite that run. Called before anything is written; on rank 0 only.
    """
    if config.trainer.get("fast_dev_run") or rank_zero_only.rank != 0:
        return None
    logger = _logger_args(config)
    dirpath = config.get("checkpoint", {}).get("dirpath") if "checkpoint" in config else None
    created = False
    if dirpath:
        folder = Path(dirpath)
    elif logger is not None:
        root = Path(logger.save_dir) / (logger.name or "")
        if logger.version is None:
            logger.version, created = _new_version(root), True
        folder = root / _run_dir_name(logger.version)
        _share_run_folder(config, logger)
    else:
        folder = Path(config.trainer.get("default_root_dir") or ".") / CHECKPOINTS
    lock = RunLock(folder).acquire()
    lock.created = created
    checkpoints = folder if dirpath or logger is None else folder / CHECKPOINTS
    if subcommand == "fit" and config.get("ckpt_path") is None:
        earlier = sorted(checkpoints.glob("*.ckpt")) if checkpoints.is_dir() else []
        if earlier:
            lock.release()
            raise ValueError(
                f"{folder} already holds a run ({earlier[0].name}); a new fit would overwrite "
                "it. Resume it with --ckpt_path last, or leave "
                "trainer.logger.init_args.version unset (or set checkpoint.dirpath) for a new "
                "folder"
            )
    remove_stale_tmp(checkpoints)
    remove_stale_tmp(folder)
    return lock


def _share_run_folder(config: Any, first: Any) -> None:
    """A CSV logger beside the first logger writes into that run's folder, ``csv/`` (a
    resumed run: ``csv_2/``, ``csv_3/``, ...; Lightning's CSVLogger would delete an earlier
    ``metrics.csv`` in the folder it is given)."""
    loggers = config.trainer.get("logger")
    run = Path(first.save_dir) / (first.name or "") / _run_dir_name(first.version)
    for logger in loggers if isinstance(loggers, list) else []:
        args = getattr(logger, "init_args", None) if hasattr(logger, "class_path") else None
        if args is None or args is first or not str(logger.class_path).endswith("CSVLogger"):
            continue
        sub, n = "csv", 1
        while (run / sub).exists():
            n += 1
            sub = f"csv_{n}"
        args.save_dir, args.name, args.version = first.save_dir, first.name, f"{run.name}/{sub}"


def _new_version(root: Path) -> int:
    """The next ``version_<n>`` below ``root``, created here (mkdir is atomic)."""
    existing = [int(m.group(1)) for p in root.glob("version_*")
                if (m := re.fullmatch(r"version_(\d+)", p.name))]  # fmt: skip
    version = max(existing, default=-1) + 1
    while True:
        try:
            root.mkdir(parents=True, exist_ok=True)
            (root / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1
        except OSError as err:
            raise WriteError(root / f"version_{version}", err) from err
