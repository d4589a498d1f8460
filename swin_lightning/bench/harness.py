"""Timing and machine helpers every benchmark table shares: interleaved medians, peak RSS,
the machine line and markdown rows."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def interleaved(
    cases: dict[str, Callable[[], object]], rounds: int, warmup: int = 2, self_timed: bool = False
) -> dict[str, float]:
    """Median seconds per call of each case, run in alternating order after warm-up.

    ``self_timed``: each case returns its own figure (e.g. seconds per step of a run it
    times inside), which is used instead of the call's duration.
    """
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            sync_device()
            start = time.perf_counter()
            result = cases[name]()
            sync_device()
            times[name].append(result if self_timed else time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def sync_device() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_rss_bytes() -> int:
    """This process's peak resident memory.

    Linux's ``VmHWM`` belongs to the process image, so it starts afresh in a new program;
    ``ru_maxrss`` (the fallback) can carry over the forking parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import lightning
    import timm
    import torchvision

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"- CPU: {cpu}, {torch.get_num_threads()} torch threads; GPU: {gpu}; "
        f"RAM: {ram:.0f} GiB\n"
        f"- Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
        f"torchvision {torchvision.__version__}, lightning {lightning.__version__}\n"
    )


def md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
