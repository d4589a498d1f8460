"""What the campaign commands (``ablate``, ``tune``) share: their ``status``/``report``
dispatch, finding a campaign's folder by path or name, the stop message, and one ``error:``
line (exit 2 for bad input, 1 for a failed write) instead of a traceback."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from swin_lightning.storage import WriteError


def campaign_dir(name: str, log_dir: str, marker: str) -> Path:
    """A campaign's folder: ``name`` itself when it holds ``marker``, else ``log_dir/name``."""
    path = Path(name)
    return path if (path / marker).is_file() else Path(log_dir) / name


def folder_parser(command: str, what: str, description: str = "") -> argparse.ArgumentParser:
    """The parser of ``<command> status|report``: the campaign's folder and ``--log_dir``."""
    parser = argparse.ArgumentParser(prog=f"python -m swin_lightning {command}",
                                     description=description or None)  # fmt: skip
    parser.add_argument(what, help=f"{what} folder, or its name under --log_dir")
    parser.add_argument("--log_dir", default="logs")
    return parser


def error_code(err: BaseException) -> int:
    """Print ``err`` as one ``error:`` line; its exit code (1: a failed write, else 2)."""
    print(f"error: {err}", file=sys.stderr)
    return 1 if isinstance(err, WriteError) else 2


def dispatch(argv: list[str], commands: dict[str, Callable[[list[str]], int]],
             launch: Callable[[list[str]], int]) -> int:  # fmt: skip
    """Run ``status``/``report`` (the first word of ``argv``) or else ``launch``; bad input and
    failed writes end as one ``error:`` line."""
    try:
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        return launch(argv)
    except (OSError, ValueError) as err:
        return error_code(err)


def stop_message(prefix: str, signum: int, running: str, again: str) -> str:
    """What a campaign stopped by a signal says: its running fits saved; the same command
    continues."""
    return (f"[{prefix}] stopped by {signal.Signals(signum).name}: the running {running} saved "
            f"their last.ckpt; run the same command again to {again}")  # fmt: skip
