"""The GPU check's Python steps (``scripts/gpu_check.sh`` runs them in order):

- ``env``: the machine (GPU, driver, CUDA, versions) as JSON; exit 2 with one ``error:`` line
  where no CUDA device is visible;
- ``fit``: Swin-T 224 trained through the real CLI (``fit``, bf16, compiled) on generated JPEGs
  for a fixed wall time; its end-to-end images/s from the run's TensorBoard events;
- ``report``: one report (``report.md`` + ``report.json``) from what the steps left in the
  folder, the summary table printed last.

Usage: ``python -m swin_lightning.bench.gpu_check {env,fit,report} OUTDIR``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from swin_lightning.storage import write_text

ENV, TESTS, BENCH, FIT, PHASES = "env.json", "gpu_tests.xml", "bench_results.json", "fit.json", "phases.json"  # fmt: skip
REPO = Path(__file__).resolve().parents[2]
FIT_CLASSES, FIT_PER_CLASS, FIT_SIZE = 32, 160, 256  # 5,120 training JPEGs of 256x256


def no_cuda_reason() -> str | None:
    """Why CUDA cannot be used here ("no CUDA device visible (torch ..., CUDA ...)"), or None."""
    import torch

    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    return f"no CUDA device visible (torch {torch.__version__}, {build}; CUDA_VISIBLE_DEVICES={visible})"


def environment() -> dict[str, Any]:
    """What the report says the check ran on. Raises RuntimeError without a CUDA device."""
    import lightning
    import timm
    import torch
    import torchvision

    reason = no_cuda_reason()
    if reason:
        raise RuntimeError(f"{reason}: run the GPU check on a machine with an NVIDIA GPU")
    props = torch.cuda.get_device_properties(0)
    driver = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip().splitlines()[0]  # fmt: skip
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "gpus": torch.cuda.device_count(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "driver": driver,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
        "cpus": os.cpu_count(),
    }


def write_images(
    root: Path, classes: int, per_class: int, size: int, val_per_class: int = 8
) -> Path:
    """An ImageFolder tree of smooth random JPEGs (upsampled noise: natural-image-like sizes
    and decode cost, unlike raw noise), saved 4:4:4 so every decoder gives nearly the same
    pixels (nvJPEG replicates chroma where libjpeg-turbo interpolates it)."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(root / split / f"c{c:03d}", per_class if split == "train" else val_per_class,
             c + 1000 * (split == "val"), size)
            for split in ("train", "val") for c in range(classes)]  # fmt: skip
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(_write_class, jobs))
    return root


def _write_class(job: tuple[Path, int, int, int]) -> None:
    import numpy as np
    from PIL import Image

    folder, count, seed, size = job
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        image.save(folder / f"{i}.jpg", quality=90, subsampling=0)


def fit_args(data: Path, logs: Path, seconds: int, workers: int) -> list[str]:
    """The check's ``fit``: the ImageNet Swin-T recipe (Mixup, RandAugment, ...) on ``data``,
    bf16, compiled whole, for ``seconds`` of wall time, no validation."""
    clock = time.strftime("%H:%M:%S", time.gmtime(seconds))
    return [
        "--config", str(REPO / "configs" / "imagenet" / "swin_t.yaml"),
        "--config", str(REPO / "configs" / "trainer" / "bf16.yaml"),
        "--trainer.accelerator=gpu", "--trainer.devices=1",
        f"--data.init_args.root={data}", f"--data.init_args.num_workers={workers}",
        "--data.init_args.decode=tensor", "--model.compile=full",
        "--trainer.max_epochs=1000", f"--trainer.max_time=00:{clock}",
        "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        "--trainer.log_every_n_steps=5", "--trainer.enable_progress_bar=false",
        "--throughput.window_size=10", f"--trainer.logger.init_args.save_dir={logs}",
    ]  # fmt: skip


def fit_throughput(run_dir: Path, skip_steps: int) -> dict[str, Any]:
    """End-to-end training images/s of a run, from its ``train/device/samples_per_sec``
    events after ``skip_steps`` (the compile and the loader's start)."""
    from swin_lightning.events import read_scalars

    events = read_scalars(run_dir).get("train/device/samples_per_sec")
    if not events:
        raise RuntimeError(f"no train/device/samples_per_sec events in {run_dir}")
    steady = [value for step, value in events if step > skip_steps] or [v for _, v in events]
    return {"img_s": statistics.median(steady), "windows": len(steady),
            "last_step": max(step for step, _ in events)}  # fmt: skip


def run_fit(out: Path, seconds: int) -> dict[str, Any]:
    data = out / "fit_data"
    if not (data / "train").is_dir():
        write_images(data, FIT_CLASSES, FIT_PER_CLASS, FIT_SIZE)
    logs = out / "fit_logs"
    workers = max(1, min(14, (os.cpu_count() or 2) - 2))
    cmd = [sys.executable, "-m", "swin_lightning", "fit", *fit_args(data, logs, seconds, workers)]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=out, capture_output=True, text=True)
    wall = time.perf_counter() - started
    write_text(out / "fit.log", done.stdout + done.stderr)
    result: dict[str, Any] = {"command": " ".join(cmd[1:]), "exit_code": done.returncode,
                              "wall_s": round(wall, 1), "batch": 128, "workers": workers}  # fmt: skip
    runs = sorted({p.parent for p in logs.rglob("events.out.tfevents.*")})
    if done.returncode == 0 and runs:
        try:
            result.update(fit_throughput(runs[-1], skip_steps=20))
        except (RuntimeError, OSError, ValueError) as err:  # ran too short to log a rate
            result["error"] = str(err)
    return result


def _tests(path: Path) -> dict[str, Any] | None:
    """Counts and failures of a JUnit XML file (pytest --junitxml)."""
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        return {"error": f"unreadable {path.name}: {err}"}
    cases = root.iter("testcase")
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures = []
    for case in cases:
        if not case.get("name"):  # the test a time limit interrupted (SIGINT) has no name
            continue
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            counts["failed"] += 1
            message = (problem.get("message") or "").strip().splitlines()
            failures.append({"test": name, "message": message[0][:300] if message else ""})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures}


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        return {"error": f"unreadable {path.name}: {err}"}


def collect(out: Path) -> dict[str, Any]:
    """Everything the steps left in ``out``, as one dict (missing steps are None)."""
    bench = _read_json(out / BENCH)
    return {
        "environment": _read_json(out / ENV),
        "phases": _read_json(out / PHASES) or {},
        "tests": _tests(out / TESTS),
        "bench": bench.get("gpu") if isinstance(bench, dict) else None,
        "fit": _read_json(out / FIT),
    }


def _raw_compiled_img_s(bench: list[dict] | None) -> float | None:
    for row in bench or []:
        if row.get("shape") == "swin_t_224" and row.get("case") == "swin_lightning, compiled full":
            return row.get("train_img_s")
    return None


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, result) lines of the summary table."""
    rows = []
    for name, phase in report["phases"].items():
        state = "ok" if phase.get("exit_code") == 0 else f"exit {phase.get('exit_code')}"
        if phase.get("exit_code") in (124, 137):
            state = "timed out"
        rows.append((f"step {name}", f"{state} ({phase.get('seconds', 0):.0f} s)"))
    tests = report["tests"]
    if tests and "error" not in tests:
        rows.append(("gpu tests", f"{tests['passed']} passed, {tests['failed']} failed, "
                     f"{tests['skipped']} skipped"))  # fmt: skip
        rows += [(f"failed: {f['test']}", f["message"]) for f in tests["failures"]]
    elif tests:
        rows.append(("gpu tests", tests["error"]))
    for row in report["bench"] or []:
        if row.get("skipped"):
            rows.append((f"bench {row['shape']}: {row['case']}", f"skipped: {row['skipped']}"))
        else:
            mfu = f", MFU {100 * row['mfu']:.1f}%" if row.get("mfu") is not None else ""
            rows.append((f"bench {row['shape']}: {row['case']}",
                         f"train {row['train_img_s']:.0f} img/s, inference "
                         f"{row['infer_img_s']:.0f} img/s{mfu}"))  # fmt: skip
    fit = report["fit"]
    if fit and fit.get("error"):
        rows.append(("fit Swin-T 224 end to end", f"no figure: {fit['error']}"))
    elif fit and "img_s" in fit:
        raw = _raw_compiled_img_s(report["bench"])
        share = f" ({100 * fit['img_s'] / raw:.0f}% of the raw compiled step)" if raw else ""
        rows.append(("fit Swin-T 224 end to end", f"{fit['img_s']:.0f} img/s{share}"))
    elif fit:
        rows.append(
            ("fit Swin-T 224 end to end", f"failed: exit {fit.get('exit_code')}, see fit.log")
        )
    return rows


def markdown(report: dict[str, Any]) -> str:
    from swin_lightning.bench.gpu import gpu_table

    env = report["environment"] or {}
    lines = ["# GPU check", ""]
    if env and "error" not in env:
        lines += [
            f"- {env['date']}: {env['gpu']} ({env['gpu_memory_gib']} GiB, compute "
            f"{env['capability']}), driver {env['driver']}, CUDA {env['cuda']}, cuDNN "
            f"{env['cudnn']}, {env['cpus']} CPUs",
            f"- Python {env['python']}, torch {env['torch']}, torchvision "
            f"{env['torchvision']}, lightning {env['lightning']}, timm {env['timm']}",
            "",
        ]
    lines += ["## Summary", "", "| what | result |", "|---|---|"]
    lines += [f"| {what} | {result} |" for what, result in summary_rows(report)]
    if report["bench"]:
        lines += ["", "## Benchmark rows (bf16)", "", *gpu_table(report["bench"])]
    fit = report["fit"]
    if fit:
        lines += ["", "## End-to-end fit", "", f"`python -m swin_lightning fit {fit['command']}`"]
    return "\n".join(lines) + "\n"


def write_report(out: Path) -> str:
    report = collect(out)
    text = markdown(report)
    write_text(out / "report.md", text)
    write_text(out / "report.json", json.dumps(report, indent=1))
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("env", "fit", "report"):
        print("usage: python -m swin_lightning.bench.gpu_check {env,fit,report} OUTDIR",
              file=sys.stderr)  # fmt: skip
        return 2
    step, out = argv[0], Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    if step == "env":
        try:
            env = environment()
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        write_text(out / ENV, json.dumps(env, indent=1))
        print(json.dumps(env, indent=1))
    elif step == "fit":
        seconds = int(os.environ.get("GPU_CHECK_FIT_SECONDS", "75"))
        result = run_fit(out, seconds)
        write_text(out / FIT, json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return 0 if result["exit_code"] == 0 else 1
    else:
        text = write_report(out)
        summary = text[text.index("## Summary") :].split("\n## ")[0]
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
