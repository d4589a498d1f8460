"""Launchers: where an ablation's runs train. Each takes a list of runs and reports outcomes.

- :class:`LocalLauncher`: on this machine, up to ``parallel`` runs at once (1: one after
  another). With GPUs each run gets its own ``gpus_per_run`` devices through
  ``CUDA_VISIBLE_DEVICES``; on CPU the cores are split between the runs (``OMP_NUM_THREADS``).
  SIGINT/SIGTERM reach every running run, which saves its ``last.ckpt``; no new run starts.
- :class:`SlurmLauncher`: one SLURM job array through submitit, one task per run (or one per
  GPU of a multi-GPU run, Lightning's DDP under SLURM). Each task runs :class:`RunJob`.
  Ahead of the time limit or on preemption, SLURM signals the job (USR2), the run saves its
  ``last.ckpt``, and submitit requeues it; the next attempt resumes. A run is requeued at most
  ``max_requeues`` times.

Both start and end attempts through :mod:`swin_lightning.runs.attempt` and keep their state in
the run folders only (:mod:`swin_lightning.runs.store`).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import time
import typing
from collections.abc import Callable
from contextlib import suppress
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import yaml

from swin_lightning.runs import attempt
from swin_lightning.runs.attempt import Attempt, RunOutcome
from swin_lightning.runs.spec import LauncherSettings, SlurmSettings
from swin_lightning.runs.store import (
    SLURM_ACTIVE,
    Run,
    slurm_job_state,
)
from swin_lightning.storage import RunBusyError, RunLock

# Seconds a fit stopped for a requeue gets to save its checkpoint before SIGKILL.
STOP_GRACE_S = 120.0


class SignalForwarder:
    """While installed: SIGINT and SIGTERM go to every running child's process group, and the
    first one received is remembered, so the launcher starts nothing new and stops once the
    children have saved."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.children: list[subprocess.Popen] = []
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
        for child in self.children:
            if child.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(child.pid, signum)


def visible_gpus() -> list[str]:
    """The GPUs this process may use (``CUDA_VISIBLE_DEVICES``, else all CUDA devices)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class LocalLauncher:
    """Runs on this machine, ``parallel`` at once.

    Args:
        parallel: Runs at once.
        gpus_per_run: GPUs per run; None: 1 when GPUs are visible and the runs use them.
        share_gpus: Allow more runs than GPU groups (runs then share GPUs, round robin).
    """

    name = "local"

    def __init__(self, parallel: int = 1, gpus_per_run: int | None = None,
                 share_gpus: bool = False) -> None:  # fmt: skip
        if parallel < 1:
            raise ValueError(f"--parallel {parallel} must be >= 1")
        if gpus_per_run is not None and gpus_per_run < 0:
            raise ValueError(f"--gpus_per_run {gpus_per_run} must be >= 0")
        self.parallel, self.gpus_per_run, self.share_gpus = parallel, gpus_per_run, share_gpus

    def slots(self, runs: list[Run]) -> list[dict[str, str]]:
        """The environment of each slot: its GPUs, or its share of the CPU cores."""
        on_gpu = any(r.accelerator not in ("cpu",) for r in runs)
        gpus = visible_gpus() if on_gpu and self.gpus_per_run != 0 else []
        per_run = (1 if gpus else 0) if self.gpus_per_run is None else self.gpus_per_run
        if per_run and not gpus:
            raise ValueError(
                f"--gpus_per_run {per_run}: no GPU is visible (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use --gpus_per_run 0"
            )
        slots = []
        if per_run:
            need = self.parallel * per_run
            if need > len(gpus) and not self.share_gpus:
                raise ValueError(
                    f"--parallel {self.parallel} x --gpus_per_run {per_run} needs {need} GPUs, "
                    f"{len(gpus)} visible ({','.join(gpus)}); lower --parallel, or pass "
                    "--share_gpus to let runs share GPUs"
                )
            for i in range(self.parallel):
                ids = [gpus[(i * per_run + j) % len(gpus)] for j in range(per_run)]
                slots.append({"CUDA_VISIBLE_DEVICES": ",".join(ids)})
        elif self.parallel > 1:
            threads = str(max(1, usable_cores() // self.parallel))
            for _ in range(self.parallel):
                slots.append({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
        else:
            slots.append({})
        return slots

    def launch(self, runs: list[Run], log: Any = print) -> tuple[list[RunOutcome], int | None]:
        """Train ``runs``; returns the outcomes and the signal that stopped it (or None)."""
        slots = self.slots(runs)
        free, queue = list(range(len(slots))), list(runs)
        active: dict[int, tuple[Attempt, RunLock]] = {}
        outcomes: list[RunOutcome] = []

        def report(o: RunOutcome) -> None:
            outcomes.append(o)
            note = f": {o.message}" if o.message else ""
            log(f"[ablate] {o.variant} seed {o.seed}: {o.status} ({o.seconds:.0f} s){note}")

        with SignalForwarder() as forwarder:
            while queue or active:
                while free and queue and not forwarder.received:
                    run, slot = queue.pop(0), free[0]
                    try:
                        lock = RunLock(run.dir).acquire()
                    except RunBusyError as err:
                        report(RunOutcome(run.variant, run.seed, "busy", 0, run.dir, str(err)))
                        continue
                    if run.finished:
                        lock.release()
                        report(RunOutcome(run.variant, run.seed, "skipped", 0, run.dir))
                        continue
                    env = slots[slot]
                    shown = {k: v for k, v in env.items() if k != "MKL_NUM_THREADS"}
                    started = attempt.start(run, lock, self.name, env=env, slot_env=shown)
                    active[free.pop(0)] = (started, lock)
                    forwarder.children = [a.process for a, _ in active.values()]
                for slot, (a, lock) in list(active.items()):
                    code = a.code
                    if code is None:
                        continue
                    try:
                        report(attempt.finish(a, code))
                    finally:
                        lock.release()
                    del active[slot]
                    free.append(slot)
                    forwarder.children = [a.process for a, _ in active.values()]
                if active:
                    time.sleep(0.2)
        return outcomes, forwarder.received


# ---------------------------------------------------------------------------- SLURM
class RunJob:
    """What one SLURM task runs: an attempt at a run, checkpointed and requeued by submitit.

    On the task of rank 0 it takes the run's lock, counts the attempt (refusing one past
    ``max_requeues`` requeues), trains, and records the end. Ranks > 0 of a multi-GPU run only
    train (Lightning's DDP reads its rank from SLURM's environment).
    """

    def __init__(self, run: Run, max_requeues: int) -> None:
        self.run, self.max_requeues = run, max_requeues
        self._attempt: Attempt | None = None
        self._handled = False  # checkpoint() ended (and recorded) the attempt

    def __getstate__(self) -> dict[str, Any]:
        return {"run": self.run, "max_requeues": self.max_requeues}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["run"], state["max_requeues"])

    @staticmethod
    def job_id() -> str:
        array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")

    @staticmethod
    def requeues() -> int:
        """How often SLURM has requeued this job (preemption, time limit, scontrol requeue)."""
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)

    def __call__(self) -> str:
        run = self.run
        env: dict[str, str] = {}
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and "OMP_NUM_THREADS" not in os.environ:  # torch's threads: the task's CPUs
            env["OMP_NUM_THREADS"] = cpus
        if int(os.environ.get("SLURM_PROCID", "0")) != 0:
            a = attempt.start(run, None, "slurm", env=env, ignore=(signal.SIGUSR2,))
            self._attempt = a
            return f"rank exit code {a.wait()}"
        try:
            lock = RunLock(run.dir).acquire()
        except RunBusyError as err:
            return f"not run: {err}"
        try:
            if run.finished:
                return "already finished"
            requeues = self.requeues()
            if requeues > self.max_requeues:
                message = (f"not started again: requeued {requeues} times, the limit is "
                           f"max_requeues={self.max_requeues}; --retry_failed resumes it")  # fmt: skip
                run.update(state="failed", message=message, exit_code=None, requeues=requeues)
                return message
            job = run.job
            # SLURM delivers USR2 to every process of the task: only this one acts on it.
            self._attempt = attempt.start(
                run, lock, "slurm", env=env, ignore=(signal.SIGUSR2,), job_id=self.job_id(),
                stdout=job.get("stdout"), stderr=job.get("stderr"), requeues=requeues,
            )  # fmt: skip
            try:
                code = self._attempt.wait()
            except Exception:
                # Raised by submitit's handler after checkpoint() ended the attempt: its
                # `scontrol requeue` fails when SLURM requeues the job itself (preemption in
                # REQUEUE mode), or no requeue was wanted. The attempt is recorded already.
                if self._handled:
                    return "ended on the requeue signal"
                raise
            if self._handled:
                return "ended on the requeue signal"
            # A SIGTERM that was no requeue of ours: scancel, or SLURM ending the job.
            outcome = attempt.finish(self._attempt, code, stopped_as="failed")
            return outcome.status
        finally:
            lock.release()

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit calls this on USR2 (time limit ahead, or preemption): stop the run at its
        next batch (it saves ``last.ckpt``), then requeue it, unless the limit is reached."""
        import submitit

        a = self._attempt
        if a is None:  # the signal came before training began: just go again
            return submitit.helpers.DelayedSubmission(RunJob(self.run, self.max_requeues))
        code = a.stop(grace=STOP_GRACE_S)
        if int(os.environ.get("SLURM_PROCID", "0")) != 0:
            return None
        self._handled = True
        if code == 0:  # it finished as the signal came: nothing to requeue
            attempt.finish(a, code)
            return None
        requeues = self.requeues()
        if requeues >= self.max_requeues:
            attempt.finish(a, code, stopped_as="failed")
            self.run.update(message=f"stopped for requeue {requeues + 1}, past max_requeues="
                            f"{self.max_requeues}; --retry_failed resumes it")  # fmt: skip
            return None
        outcome = attempt.finish(a, code, stopped_as="pending")
        self.run.update(message=f"requeued after attempt {self.run.record.get('attempts')} "
                        f"({outcome.message})")  # fmt: skip
        return submitit.helpers.DelayedSubmission(RunJob(self.run, self.max_requeues))


class SlurmLauncher:
    """Submits runs as one SLURM job array through submitit (``settings``: the resources)."""

    name = "slurm"

    def __init__(self, settings: SlurmSettings, folder: Path, job_name: str = "ablate") -> None:
        self.settings, self.folder, self.job_name = settings, Path(folder), job_name

    def executor(self) -> Any:
        try:
            import submitit
        except ImportError:
            raise ValueError(
                "--launcher slurm needs submitit: pip install 'swin_lightning[slurm]'"
            ) from None
        s = self.settings
        executor = submitit.SlurmExecutor(folder=self.folder / "%j", max_num_timeout=s.max_requeues)
        params = {
            "time": s.time_min, "nodes": s.nodes, "ntasks_per_node": max(1, s.gpus_per_node),
            "signal_delay_s": s.signal_delay_s, "job_name": self.job_name,
            "additional_parameters": dict(s.additional_parameters), "setup": list(s.setup),
        }  # fmt: skip
        optional = {
            "partition": s.partition, "gpus_per_node": s.gpus_per_node or None,
            "cpus_per_task": s.cpus_per_task, "account": s.account, "qos": s.qos,
            "constraint": s.constraint, "array_parallelism": s.array_parallelism,
            "mem": (f"{int(s.mem_gb)}GB" if s.mem_gb == int(s.mem_gb) else
                    f"{int(s.mem_gb * 1024)}MB") if s.mem_gb else None,
        }  # fmt: skip
        params.update({k: v for k, v in optional.items() if v is not None})
        executor.update_parameters(**params)
        return executor

    def run_args(self) -> list[str]:
        """Trainer settings a run of these resources needs (DDP over the tasks)."""
        s, out = self.settings, []
        if s.gpus_per_node > 1:
            out.append(f"--trainer.devices={s.gpus_per_node}")
        if s.nodes > 1:
            out.append(f"--trainer.num_nodes={s.nodes}")
        return out

    def launch(self, runs: list[Run], log: Any = print) -> tuple[list[RunOutcome], int | None]:
        """Submit the runs not finished, queued or running; returns at once."""
        executor = self.executor()
        outcomes, todo = [], []
        for run in runs:
            job = run.job
            state = slurm_job_state(job.get("job_id", "")) if job else None
            if run.finished:
                outcomes.append(RunOutcome(run.variant, run.seed, "skipped", 0, run.dir))
            elif state in SLURM_ACTIVE or RunLock(run.dir).held_by():
                message = f"already queued or running as SLURM job {job.get('job_id')} ({state})"
                outcomes.append(RunOutcome(run.variant, run.seed, "queued", 0, run.dir, message))
            else:
                todo.append(run)
        for o in outcomes:
            log(
                f"[ablate] {o.variant} seed {o.seed}: {o.status}"
                + (f": {o.message}" if o.message else "")
            )
        if not todo:
            return outcomes, None
        for run in todo:  # before the job can start and record its attempt
            run.update(state="submitted", message="")
        with executor.batch():
            jobs = [executor.submit(RunJob(run, self.settings.max_requeues)) for run in todo]
        for run, job in zip(todo, jobs, strict=True):
            run.update_job(job_id=job.job_id, stdout=str(job.paths.stdout),
                        stderr=str(job.paths.stderr), submitted=time.time(),
                        submit_host=socket.gethostname())  # fmt: skip
            outcomes.append(RunOutcome(run.variant, run.seed, "submitted", 0, run.dir,
                                       f"SLURM job {job.job_id}"))  # fmt: skip
            log(f"[ablate] {run.variant} seed {run.seed}: submitted as SLURM job {job.job_id}")
        return outcomes, None


# ---------------------------------------------------------------------------- flags
def _sbatch_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--sbatch {text!r}: give KEY=VALUE, e.g. mail-type=END")
    return key, yaml.safe_load(value)


def _field_docs(cls: type) -> dict[str, str]:
    """The ``Args:`` entries of a dataclass docstring, by field name (for --help)."""
    docs: dict[str, str] = {}
    name = None
    for line in (cls.__doc__ or "").partition("Args:")[2].splitlines():
        key, sep, text = line.strip().partition(": ")
        if (
            sep
            and key.isidentifier()
            and line.startswith(" " * 8)
            and not line.startswith(" " * 12)
        ):
            name, docs[key] = key, text
        elif name and line.strip():
            docs[name] += " " + line.strip()
    return docs


def flag_type(hint: Any) -> Callable[[str], Any]:
    """The argparse ``type`` of a settings field from its type hint: ``int``, ``float``,
    ``bool`` (true/false, yes/no, 1/0) or ``str``, also inside ``X | None``."""
    kinds = [k for k in typing.get_args(hint) or (hint,) if k is not type(None)]
    kind = kinds[0] if len(kinds) == 1 else str
    if kind is bool:
        return _boolean
    return kind if kind in (int, float) else str


def _boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean (true or false)")


def add_launcher_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("launcher (overrides the spec's launcher: section)")
    group.add_argument("--launcher", choices=["local", "slurm"], dest="name")
    group.add_argument("--parallel", type=int, help="local runs at once (default 1)")
    group.add_argument("--gpus_per_run", type=int, help="GPUs per local run (default 1 on GPU)")
    group.add_argument("--share_gpus", action="store_true", default=None,
                       help="let local runs share GPUs when there are too few")  # fmt: skip
    slurm = parser.add_argument_group("SLURM resources per run (--launcher slurm)")
    docs = _field_docs(SlurmSettings)
    hints = typing.get_type_hints(SlurmSettings)
    for f in fields(SlurmSettings):
        if f.name not in ("additional_parameters", "setup"):
            help_text = f"{docs.get(f.name, '')} (default {f.default})".replace("%", "%%")
            slurm.add_argument(f"--{f.name}", type=flag_type(hints[f.name]), help=help_text)
    slurm.add_argument("--sbatch", type=_sbatch_option, action="append", default=[],
                       metavar="KEY=VALUE", help="any other sbatch option (repeat)")  # fmt: skip


def launcher_settings(args: argparse.Namespace, spec: LauncherSettings) -> LauncherSettings:
    """The spec's launcher section with the flags given on the command line over it."""
    given = {f.name: getattr(args, f.name) for f in fields(LauncherSettings)
             if f.name != "slurm" and getattr(args, f.name, None) is not None}  # fmt: skip
    slurm = {f.name: getattr(args, f.name) for f in fields(SlurmSettings)
             if getattr(args, f.name, None) is not None}  # fmt: skip
    extra = {**spec.slurm.additional_parameters, **dict(args.sbatch)}
    return replace(spec, **given,
                   slurm=replace(spec.slurm, **slurm, additional_parameters=extra))  # fmt: skip
