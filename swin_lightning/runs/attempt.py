"""One attempt at one run: the ``fit`` process, started and ended the same way by every launcher.

:func:`start` takes the run's folder as it finds it (resuming from ``last.ckpt`` when there is
one), records the attempt in ``run.json`` and starts ``python -m swin_lightning fit`` in its
own session, with the run's lock handed down. :func:`finish` turns the exit code into the
run's state: finished (``finished.json``, HParams), interrupted (a signal stopped it after it
saved) or failed (with the log to read).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from swin_lightning.protocol import (
    CHECKPOINTS,
    LAST_CKPT,
    LAUNCHER_ENV,
    SIGINT_EXIT_CODE,
    SIGTERM_EXIT_CODE,
)
from swin_lightning.report import read_run
from swin_lightning.runs.spec import varied_settings
from swin_lightning.runs.store import Run
from swin_lightning.storage import RunLock

STOPPED_CODES = (SIGINT_EXIT_CODE, SIGTERM_EXIT_CODE, -signal.SIGINT, -signal.SIGTERM)


@dataclass
class RunOutcome:
    """What one launch did with a run (``status`` is what ``ablate`` prints)."""

    variant: str
    seed: int
    status: str  # done, skipped, resumed, failed, busy, interrupted, submitted
    seconds: float = 0.0
    run_dir: Path | None = None
    message: str = ""


@dataclass
class Attempt:
    """A started ``fit`` process of a run, reaped by a thread of its own, so a signal handler
    may wait for it while the main thread waits too (``Popen.wait`` is not re-entrant)."""

    run: Run
    process: subprocess.Popen
    resumed: bool
    log: IO[str]
    started: float
    code: int | None = None
    ended: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        threading.Thread(target=self._reap, daemon=True).start()

    def _reap(self) -> None:
        self.code = self.process.wait()
        self.ended.set()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None if it has not ended within ``timeout`` seconds."""
        self.ended.wait(timeout)
        return self.code

    def stop(self, grace: float = 120.0) -> int:
        """SIGTERM to the fit's process group (it saves ``last.ckpt`` at its next batch),
        SIGKILL if it has not ended within ``grace`` seconds; its exit code."""
        if self.code is None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
        code = self.wait(timeout=grace)
        if code is None:  # it did not save in time
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            code = self.wait()
        return code


def fit_command(run: Run, resume: bool) -> list[str]:
    """The ``fit`` command line of a run: its settings, its seed, its folder."""
    cmd = [
        sys.executable, "-m", "swin_lightning", "fit", *run.args,
        f"--seed_everything={run.seed}",
        "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
        f"--trainer.logger.init_args.save_dir={run.dir.parent}",
        "--trainer.logger.init_args.name=",
        f"--trainer.logger.init_args.version={run.dir.name}",
        "--trainer.logger.init_args.default_hp_metric=false",
        "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    if resume:
        cmd.append(f"--ckpt_path={run.dir / CHECKPOINTS / LAST_CKPT}")
    return cmd


def _fresh_start(run_dir: Path) -> None:
    """An attempt that died before its first checkpoint: its partial curves would mix with
    the new ones, so drop its events (its fit.log is kept, numbered)."""
    for events in run_dir.glob("events.out.tfevents.*"):
        events.unlink()
    if (run_dir / "fit.log").exists():
        n = len(list(run_dir.glob("fit.log.*"))) + 1
        (run_dir / "fit.log").rename(run_dir / f"fit.log.{n}")


def _child_setup(ignore: tuple[int, ...]) -> Callable[[], None]:
    def setup() -> None:
        """In the child, before exec: SIGTERM it when its launcher dies, even by SIGKILL
        (Linux), and ignore the signals the launcher handles for it."""
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        for signum in ignore:
            signal.signal(signum, signal.SIG_IGN)

    return setup


def start(
    run: Run,
    lock: RunLock | None,
    launcher: str,
    env: dict[str, str] | None = None,
    ignore: tuple[int, ...] = (),
    **record: object,
) -> Attempt:
    """Start a ``fit`` attempt of ``run`` (``lock``: held by the caller, handed down; None on
    the DDP ranks > 0 of a SLURM run, which only train)."""
    last = run.dir / CHECKPOINTS / LAST_CKPT
    resume = last.is_file()
    if lock is not None:
        if not resume:
            _fresh_start(run.dir)
        run.attempt_started(launcher, **record)
    cmd = fit_command(run, resume)
    child_env = {**os.environ, LAUNCHER_ENV: launcher, **(env or {}),
                 **(lock.env() if lock else {})}  # fmt: skip
    name = "fit.log" if lock else f"fit.rank{os.environ.get('SLURM_PROCID')}.log"
    log = open(run.dir / name, "a")  # noqa: SIM115 (closed by finish)
    log.write(" ".join(cmd) + "\n")
    log.flush()
    # Its own session (a Ctrl+C reaches it through the launcher, once), the run's lock handed
    # down (held until both have exited), and it dies with the launcher.
    process = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        pass_fds=[lock.fd] if lock else [], env=child_env, preexec_fn=_child_setup(ignore),
    )  # fmt: skip
    return Attempt(run, process, resume, log, time.perf_counter())


def finish(attempt: Attempt, code: int, stopped_as: str = "interrupted") -> RunOutcome:
    """Record how the attempt ended (``stopped_as``: the state of a run a signal stopped)."""
    attempt.log.close()
    run, seconds = attempt.run, time.perf_counter() - attempt.started
    last = run.dir / CHECKPOINTS / LAST_CKPT
    if code in STOPPED_CODES:
        saved = f"its last.ckpt is {last}" if last.is_file() else "it had saved no checkpoint"
        name = {
            SIGINT_EXIT_CODE: "SIGINT",
            -signal.SIGINT: "SIGINT",
            SIGTERM_EXIT_CODE: "SIGTERM",
            -signal.SIGTERM: "SIGTERM",
        }[code]
        run.attempt_ended(stopped_as, code, f"stopped by {name}; {saved}")
        return RunOutcome(run.variant, run.seed, "interrupted", seconds, run.dir, saved)
    if code != 0:
        message = f"exit code {code}; see {run.dir / 'fit.log'}"
        run.attempt_ended("failed", code, message)
        return RunOutcome(run.variant, run.seed, "failed", seconds, run.dir, message)
    log_hparams(run)
    total = float(run.record.get("seconds") or 0) + seconds
    run.mark_finished(total, attempt.resumed)
    status = "resumed" if attempt.resumed else "done"
    return RunOutcome(run.variant, run.seed, status, seconds, run.dir)


def log_hparams(run: Run) -> None:
    """Write the run's varied settings and final metrics for TensorBoard's HParams tab."""
    from lightning.pytorch.loggers import TensorBoardLogger

    result = read_run(run.dir, run.variant, str(run.seed))
    if result is None:
        return
    params = {"variant": run.variant, "seed": run.seed}
    params.update({k: v for k, v in varied_settings(run.items).items() if not isinstance(v, list)})
    metrics = {
        "hp/best_val_acc1": result.best_val_acc1,
        "hp/final_val_acc1": result.final_val_acc1,
    }
    if result.val_loss:
        metrics["hp/final_val_loss"] = result.val_loss[-1]
    logger = TensorBoardLogger(
        save_dir=str(run.dir.parent), name="", version=run.dir.name, default_hp_metric=False
    )
    logger.log_hyperparams(params, metrics)
    logger.finalize("success")
