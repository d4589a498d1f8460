"""Shared fixtures: datasets written in their real on-disk formats, and the CLI in-process."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test`: one worker per core (pytest-xdist)
    # One torch thread per worker, inherited by the runs the tests start: two workers of two
    # spinning OpenMP threads each on two cores made the suite slower than one worker.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from swin_lightning.cli import cli_main

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # if torch was imported before

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def write_cifar(root: Path, hundred: bool = False, n_train: int = 50, n_test: int = 20) -> Path:
    """CIFAR-10/100 python pickles (the layout of the official archives) with random pixels."""
    rng = np.random.default_rng(0)
    n_classes = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    key = "fine_labels" if hundred else "labels"

    def batch(n: int) -> dict:
        return {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            key: rng.integers(0, n_classes, n).tolist(),
        }

    files = {"train": batch(n_train), "test": batch(n_test)} if hundred else {
        **{f"data_batch_{i}": batch(n_train // 5) for i in range(1, 6)},
        "test_batch": batch(n_test),
    }  # fmt: skip
    names = [f"class{i}" for i in range(n_classes)]
    files["meta" if hundred else "batches.meta"] = (
        {"fine_label_names": names} if hundred else {"label_names": names}
    )
    for name, content in files.items():
        with open(folder / name, "wb") as f:
            pickle.dump(content, f)
    return root


def write_imagefolder(
    root: Path, classes=("cat", "dog", "ship"), per_class: int = 4, size: int = 40, fmt: str = "png"
) -> Path:
    """root/{train,val}/<class>/<n>.<fmt> with random RGB images."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.{fmt}")
    return root


def run_cli(*args: str, run: bool = True):
    """Call the CLI in-process, quietly; returns the LightningCLI object."""
    return cli_main([*args, *QUIET], run=run) if run else cli_main(list(args), run=False)


def cuda_missing_reason() -> str | None:
    """Why the ``gpu`` tests cannot run here (None: a CUDA device is visible)."""

    from swin_lightning.bench.gpu_check import no_cuda_reason

    reason = no_cuda_reason()
    return f"gpu: {reason}; scripts/gpu_check.sh runs these on a GPU machine" if reason else None


def pytest_collection_modifyitems(config, items) -> None:
    """Everything under tests/gpu/ is marked ``gpu``; ``gpu`` tests skip, with the reason,
    where no CUDA device is visible (``pytest -m gpu`` selects them).

    The longest modules come first (:data:`MODULE_SECONDS`), each module's tests together and in order: ``make
    test`` hands whole modules to its workers (``--dist loadscope``, so a module's trained
    fixture is built once), in this order, and no long module should start last while the
    other worker idles."""
    gpu_dir = Path(__file__).resolve().parent / "gpu"
    reason = cuda_missing_reason()
    for item in items:
        if gpu_dir in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
        if reason and item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.skip(reason=reason))
    slow_modules = {item.module for item in items if item.get_closest_marker("slow")}

    def seconds(item: pytest.Item) -> float:
        name = item.module.__name__.rpartition(".")[2]
        return MODULE_SECONDS.get(name, 30.0 if item.module in slow_modules else 0.0)

    items.sort(key=lambda item: -seconds(item))  # stable: modules stay whole, longest first


# Seconds each module took on one worker (junit times summed per module: `make test
# PYTEST_ADDOPTS=--junitxml=j.xml` on the 2-core CI machine, 2026-12-06). `make test` hands
# the modules out longest first (with --no-loadscope-reorder, which would sort them by test
# count), so no long module starts last while the other worker idles. A module not listed
# counts 30 s if it has a slow test, else 0.
MODULE_SECONDS = {
    "test_reliability": 168, "test_slurm": 146, "test_tune": 113, "test_packed": 112,
    "test_training": 109, "test_ablation": 105, "test_bench": 100, "test_cli_configs": 99,
    "test_resume": 87, "test_launchers": 57, "test_gpu_check": 26, "test_simmim": 21,
    "test_export": 60, "test_loggers": 17, "test_bad_input": 16, "test_compile": 15,
    "test_model_shapes": 13, "test_equivalence": 11, "test_swinv2": 9, "test_features": 7,
    "test_pretrained": 6,
    # added after that measurement, from single-module runs on the same machine (2026-12-06)
    "test_analyze": 60, "test_swin_mlp": 45, "test_verify": 12,
    "test_load_model": 6, "test_stats": 2,
}  # fmt: skip


@pytest.fixture
def dynamo():
    """torch.compile's counters (graphs, graph breaks, frames) from a clean dynamo state."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.fixture
def tiny_fs(tmp_path):
    """Mount a small tmpfs (root only); yields a function size_mb -> mount point."""
    mounts = []

    def mount(size_mb: float) -> Path:
        point = tmp_path / f"fs{len(mounts)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size_mb * 1024)}k",
                               "tmpfs", str(point)], capture_output=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode()[:200]}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in a temporary folder, so logs/ and checkpoints land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# A demo run cut down to seconds: small data, two short epochs.
TINY_DEMO = [
    "--config", str(CONFIGS / "demo.yaml"),
    "--data.init_args.train_size=64",
    "--data.init_args.val_size=32",
    "--data.init_args.batch_size=16",
    "--trainer.max_epochs=2",
    "--trainer.log_every_n_steps=1",
]  # fmt: skip


@pytest.fixture(scope="session")
def slurm():
    """A real single-node SLURM (slurmctld + slurmd on localhost) for the session's tests.

    Skips where it cannot start (not installed, not root), unless SWIN_REQUIRE_SLURM=1 (CI),
    where that is a failure."""
    import shutil
    import tempfile

    from tests.slurm_cluster import missing_reason, start_cluster

    reason = missing_reason()
    if reason:
        if os.environ.get("SWIN_REQUIRE_SLURM") == "1":
            pytest.fail(f"SWIN_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    folder = Path(tempfile.mkdtemp(prefix="swin-slurm-"))
    cluster = start_cluster(folder)
    yield cluster
    cluster.stop()
    shutil.rmtree(folder, ignore_errors=True)


LOAD_IN_A_NEW_PROCESS = """
import sys, torch
from swin_lightning import load_model
from swin_lightning.{module} import {cls}
model = {cls}.load_from_checkpoint(sys.argv[1], weights_only=True).eval()
x = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save({{"module": model.net(x), "load_model": load_model(sys.argv[1]).net(x)}}, sys.argv[3])
"""


def load_elsewhere(module: str, cls: str, ckpt, x: torch.Tensor, folder) -> dict:
    """``cls.load_from_checkpoint(ckpt)`` and ``load_model(ckpt)`` on ``x`` in a new Python
    process, in a folder with no config: what each gives."""
    torch.save(x, folder / "x.pt")
    code = LOAD_IN_A_NEW_PROCESS.format(module=module, cls=cls)
    done = subprocess.run([sys.executable, "-c", code, str(ckpt), "x.pt", "out.pt"], cwd=folder,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(folder / "out.pt", weights_only=True)


def save_like_lightning(module, path, **extra) -> None:
    """The checkpoint a Trainer writes for ``module`` (weights, hyperparameters, its
    on_save_checkpoint entries), plus ``extra`` entries, without training."""
    import lightning as L

    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": L.__version__, "global_step": 0, "epoch": 0}  # fmt: skip
    module.on_save_checkpoint(checkpoint)
    torch.save({**checkpoint, **extra}, path)
