"""Checked writes, run-folder locks, free-space preflight and checkpoint integrity checks.

Every file the project writes goes through :func:`atomic_open` (or the helpers over it): the
bytes go to a temporary file in the target's own folder, are flushed and fsynced, and the file
is renamed into place, so a reader sees the old file or the new one, never half of one (a
rename within one file system is atomic, also on the shared file systems clusters use; a move
from a local ``/tmp`` is a copy and is not). A failure is a :class:`WriteError` naming the
path and the OS reason, and the previous file is left as it was.

:class:`RunLock` gives one process a run folder: an ``flock`` on ``<run>/.lock``, released by
the kernel when its holder dies, so a stale lock never blocks; a second holder is refused
with the first one's PID and host.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import socket
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import torch

# The run lock a launcher hands to the fit it starts: "<fd>:<run dir>" (RunLock.env).
LOCK_ENV = "SWIN_LIGHTNING_RUN_LOCK"

LOCK_FILE = ".lock"
# A launcher that holds a run's lock hands it to the run's process: "<fd>:<run folder>".
TMP_SUFFIX = ".tmp"


class WriteError(OSError):
    """A file could not be written: names the path and the OS reason (EACCES, ENOSPC, ...)."""

    def __init__(self, path: str | Path, err: OSError):
        super().__init__(err.errno, err.strerror or str(err))
        self.path = Path(path)
        self.reason = err.strerror or str(err)

    def __str__(self) -> str:
        code = errno.errorcode.get(self.errno or 0, "")
        hint = (
            " (the disk is full: free space or write elsewhere)"
            if self.errno == errno.ENOSPC
            else ""
        )
        return f"cannot write {self.path}: {self.reason}{f' [{code}]' if code else ''}{hint}"


class RunBusyError(RuntimeError):
    """The run folder is locked by another live process."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: truncated, damaged or not a Lightning checkpoint."""


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}{TMP_SUFFIX}")


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; some file systems refuse to open folders: no harm.
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", newline: str | None = None) -> Iterator[IO]:
    """Open ``path`` for writing through a temporary file in its folder, renamed on success.

    Raises :class:`WriteError` (path and OS reason) when any step fails; the temporary file is
    removed and the previous ``path``, if any, stays untouched.
    """
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        binary = "b" in mode
        with open(tmp, "wb" if binary else "w", newline=None if binary else newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        with suppress(OSError):
            tmp.unlink()
        if isinstance(err, WriteError):
            raise
        raise WriteError(path, err) from err
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write ``text`` to ``path``."""
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Atomically save a matplotlib figure (format from the suffix)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png")
    return write_bytes(path, buffer.getvalue())


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Delete temporary files that killed writers left in ``folder`` (call with its lock held)."""
    removed = []
    for tmp in folder.glob(f".*{TMP_SUFFIX}") if folder.is_dir() else []:
        with suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


# ---------------------------------------------------------------------------- free space
def check_writable(folder: Path, need_bytes: int = 0, what: str = "checkpoints") -> None:
    """Fail early unless ``folder`` takes a file and has ``need_bytes`` free."""
    folder = Path(folder)
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        write_bytes(probe, b"ok")
    except WriteError as err:
        reason = f"cannot create files there: {err.reason}"
        raise WriteError(folder, OSError(err.errno, reason)) from None
    with suppress(OSError):
        probe.unlink()
    free = _free_bytes(folder)
    if need_bytes and free < need_bytes:
        raise WriteError(
            folder,
            OSError(
                errno.ENOSPC,
                f"not enough free space for {what}: about {need_bytes / 2**20:,.1f} MiB needed, "
                f"{free / 2**20:,.1f} MiB free",
            ),
        )


def _free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def checkpoint_bytes_estimate(module: torch.nn.Module, optimizer_states: int = 2) -> int:
    """Bytes of a full checkpoint of ``module``: weights and buffers, plus ``optimizer_states``
    tensors per trainable parameter (Adam and AdamW keep two moments), plus 10% for the rest."""
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return int(1.1 * (params + buffers + optimizer_states * trainable))


# ---------------------------------------------------------------------------- run lock
class RunLock:
    """An exclusive lock on a run folder (``flock`` on ``<run>/.lock``).

    The kernel drops the lock when the holding process dies, however it dies; a folder locked
    by a dead process is free. The lock file records the holder (PID, host, start time,
    command) while it is held and is emptied on release, so a finished run's folder reads the
    same before and after a refused command.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None
        self.inherited = False
        self.created = False  # set by whoever created the folder for this run
        self._before: set[Path] = set()

    def holder(self) -> str:
        """Who holds the lock, as its holder recorded it."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            text = ""
        return text or "an unknown process"

    def held_by(self) -> str | None:
        """Who holds the lock now (as recorded), or None when the folder is free. Takes
        nothing: a free folder stays free."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None  # no lock file: nobody ever locked it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self.holder()
        finally:
            os.close(fd)  # drops the shared lock taken for the test
        return None

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunBusyError` naming the holder."""
        import fcntl

        inherited = self._inherited_fd()
        if inherited is not None:
            self.fd, self.inherited = inherited, True
            self._before = self._files()
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise WriteError(self.path, err) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunBusyError(
                f"run folder {self.run_dir} is in use by {self.holder()}; wait for that "
                "process to end or stop it, or write this run elsewhere"
            ) from None
        self.fd = fd
        self._before = self._files()
        info = (
            f"pid {os.getpid()} on host {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
        except OSError as err:
            self.release()
            raise WriteError(self.path, err) from err
        return self

    def _inherited_fd(self) -> int | None:
        """The fd a launcher passed down for this very folder, if it is there and locked."""
        import fcntl

        value = os.environ.get(LOCK_ENV, "")
        fd_text, _, folder = value.partition(":")
        if not fd_text.isdigit() or Path(folder).resolve() != self.run_dir.resolve():
            return None
        fd = int(fd_text)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            if same:  # re-locking the same open file is a no-op for its holder, else refused
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None
        return fd if same else None

    def env(self) -> dict[str, str]:
        """Environment for a child process that inherits this lock (pass ``pass_fds=[fd]``)."""
        assert self.fd is not None, "acquire() first"
        return {LOCK_ENV: f"{self.fd}:{self.run_dir.resolve()}"}

    def release(self) -> None:
        if self.fd is None:
            return
        if not self.inherited:
            with suppress(OSError):
                os.ftruncate(self.fd, 0)
            with suppress(OSError):
                os.close(self.fd)  # closing the last fd of the open file drops the lock
        self.fd = None

    def _files(self) -> set[Path]:
        return {p for p in self.run_dir.rglob("*") if p.is_file()}

    def undo(self) -> None:
        """For a command refused before it started: delete the files it added to the folder
        since :meth:`acquire` (e.g. the empty event file Lightning's setup creates), and the
        folder itself if this command created it and nothing else is left."""
        for new in sorted(self._files() - self._before - {self.path}):
            with suppress(OSError):
                new.unlink()
        for folder in sorted((p for p in self.run_dir.rglob("*") if p.is_dir()), reverse=True):
            with suppress(OSError):
                folder.rmdir()  # only empty ones go
        with suppress(OSError):
            if self.created and all(p.name == LOCK_FILE for p in self.run_dir.iterdir()):
                self.path.unlink(missing_ok=True)
                self.run_dir.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ---------------------------------------------------------------------------- checkpoints
def _intact(path: Path) -> bool:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(state, dict) and "state_dict" in state


def newest_intact_checkpoint(folder: Path, exclude: Path | None = None) -> Path | None:
    """The most recently written checkpoint in ``folder`` that loads, other than ``exclude``."""
    candidates = sorted(
        (p for p in Path(folder).glob("*.ckpt") if exclude is None or p != exclude),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    return next((p for p in candidates if _intact(p)), None)


def _damage(path: Path, err: BaseException) -> str:
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in str(err):
        # torch's text advises weights_only=False, which would run code from the file: never.
        return (
            "it holds Python objects other than tensors and plain values, which are not "
            "loaded from untrusted files (it was not written by Lightning or was altered)"
        )
    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        return "it is empty"
    if (
        isinstance(err, zipfile.BadZipFile | EOFError)
        or "zip archive" in str(err)
        or ("central directory" in str(err))
    ):
        return f"it is truncated or damaged ({size:,} bytes; a write was cut short)"
    return f"it is damaged ({type(err).__name__}: {str(err).splitlines()[0][:200]})"


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """Load a Lightning checkpoint with ``weights_only=True``; a damaged or foreign file is a
    :class:`CheckpointError` that names it, what is wrong and the newest intact checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {path}: no such checkpoint")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head != b"PK\x03\x04":  # torch.save's zip format starts with a local file header
            raise zipfile.BadZipFile("not a zip archive")
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:
        raise CheckpointError(_checkpoint_message(path, _damage(path, err))) from None
    if not isinstance(state, dict) or "state_dict" not in state or "global_step" not in state:
        raise CheckpointError(
            _checkpoint_message(
                path,
                "it is not a Lightning training checkpoint (no 'state_dict' and 'global_step'); "
                "to start from plain weights use --model.pretrained",
            )
        )
    return state


def _checkpoint_message(path: Path, what: str) -> str:
    other = newest_intact_checkpoint(path.parent, exclude=path)
    advice = (
        f"the newest intact checkpoint in that folder is {other}: pass it as --ckpt_path"
        if other is not None
        else "no intact checkpoint is in that folder: start a new run without --ckpt_path"
    )
    return f"checkpoint {path} cannot be used: {what}; {advice}"


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_open`: serialised in memory first (as Lightning
    does), so a failing disk raises a clean :class:`WriteError` and never leaves half a file."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    write_bytes(path, buffer.getbuffer())
