"""The GPU check as far as a CPU allows: the gpu tests skip here with their reason, the check
script refuses a machine without a GPU in one line, the wheelhouse covers what a bare GPU image
lacks, and the report is written from what the steps leave behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from email import message_from_bytes
from importlib.metadata import PackageNotFoundError, distribution

import pytest
import torch
from packaging.requirements import Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

from swin_lightning.bench.gpu import GpuCase, bench_gpu, build_case, gpu_table
from swin_lightning.bench.gpu_check import fit_throughput
from swin_lightning.bench.gpu_check import main as check_main
from tests.conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

WHEELS = REPO / "scripts" / "gpu_wheels.txt"
# The GPU nodes' Python: 3.12 on Linux x86-64.
NODE = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
        "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
        "implementation_name": "cpython", "platform_python_implementation": "CPython"}  # fmt: skip
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU paths")


def wheel_list() -> tuple[set[str], dict[str, str]]:
    """The image's packages and the wheelhouse's pins (name -> version) of gpu_wheels.txt."""
    image, pins = set(), {}
    for line in WHEELS.read_text().splitlines():
        if line.startswith("# image:"):
            image |= {canonicalize_name(n) for n in line.removeprefix("# image:").split()}
        elif line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return image, pins


def requirements(
    name: str, version: str, extras: tuple[str, ...] = ("",)
) -> list[Requirement] | None:
    """What ``name==version`` (a pin of the wheelhouse) requires on a GPU node; None where
    neither its wheel nor that version is here to read."""
    meta = wheel_metadata(name, version)
    if meta is None:
        return None
    needed = []
    for req in map(Requirement, meta):
        if req.marker is None or any(req.marker.evaluate({**NODE, "extra": e}) for e in extras):
            needed.append(req)
    return needed


def wheel_metadata(name: str, version: str) -> list[str] | None:
    """``Requires-Dist`` of ``name==version``: from its wheel in .whl/, or from the installed
    distribution when that is the same version; None when neither is here. (The installed
    copy may be newer than the pin: its requirements are not the node's.)"""
    for wheel in (REPO / ".whl").glob("*.whl"):
        wheel_name, wheel_version, _, _ = parse_wheel_filename(wheel.name)
        if wheel_name == name and str(wheel_version) == version:
            with zipfile.ZipFile(wheel) as archive:
                path = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
                return message_from_bytes(archive.read(path)).get_all("Requires-Dist") or []
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        dist = None
    return dist.requires or [] if dist is not None and dist.version == version else None


def test_the_wheelhouse_and_the_image_cover_what_the_check_imports():
    image, pins = wheel_list()
    assert not image & set(pins), "a package is both in the image and in the wheelhouse"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    roots = [Requirement(r) for r in [*project["dependencies"], *extras["packed"],
                                      *extras["export"], "pytest"]]  # fmt: skip
    missing, unread, todo, seen = [], [], list(roots), set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), (
                f"gpu_wheels.txt pins {name}=={pins[name]}, outside {req} that is required"
            )
            if name not in seen:
                seen.add(name)
                needs = requirements(name, pins[name], ("", *req.extras))
                todo += needs or []
                unread += [f"{name}=={pins[name]}"] if needs is None else []
        elif name not in image:
            missing.append(str(req))
    assert not missing, f"neither in the GPU image nor in scripts/gpu_wheels.txt: {missing}"
    if unread:  # their own requirements were not checked
        why = f"no wheel in .whl/ and another version installed here: {unread}"
        if os.environ.get("SWIN_REQUIRE_WHEELHOUSE") == "1":
            pytest.fail(f"SWIN_REQUIRE_WHEELHOUSE=1 but {why}; run make wheelhouse")
        pytest.skip(f"{why} (make wheelhouse fills .whl/)")
    assert seen == set(pins), f"wheels nothing needs: {set(pins) - seen}"


def node_tags() -> set[Tag]:
    platforms = [f"manylinux_2_{n}_x86_64" for n in range(17, 29)] + [
        "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"]  # fmt: skip
    return {*cpython_tags((3, 12), platforms=platforms),
            *compatible_tags((3, 12), "cp312", platforms)}  # fmt: skip


def test_the_downloaded_wheelhouse_installs_for_the_gpu_nodes(tmp_path):
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    if not wheels:
        if os.environ.get("SWIN_REQUIRE_WHEELHOUSE") == "1":
            pytest.fail("SWIN_REQUIRE_WHEELHOUSE=1 but .whl/ is empty: run make wheelhouse")
        pytest.skip(".whl/ is empty: make wheelhouse fills it (CI runs it)")
    _, pins = wheel_list()
    tags = node_tags()
    found = {}
    for wheel in wheels:
        name, version, _, wheel_tags = parse_wheel_filename(wheel.name)
        assert name not in found, f"two wheels of {name} in .whl/"
        assert wheel_tags & tags, f"{wheel.name} does not install on CPython 3.12 x86-64"
        found[name] = str(version)
    assert found == pins  # exactly the listed wheels, at their pinned versions
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
         "--disable-pip-version-check", "--only-binary=:all:", "--python-version", "3.12",
         "--platform", "manylinux2014_x86_64", "--target", str(tmp_path / "site"),
         *map(str, wheels)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "site" / "jsonargparse" / "__init__.py").is_file()


@cpu_only
def test_gpu_tests_skip_here_and_say_why():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-rs",
         "-p", "no:cacheprovider", "-o", "addopts=--strict-markers"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:]
    counts = re.search(r"(\d+) skipped", done.stdout)
    assert counts and int(counts.group(1)) >= 20 and " passed" not in done.stdout
    assert "gpu: no CUDA device visible" in done.stdout
    assert "scripts/gpu_check.sh runs these on a GPU machine" in done.stdout


@cpu_only
def test_check_script_without_a_gpu_is_one_error_line(tmp_path):
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path / "report")],
        capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no CUDA device visible"), lines
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path / "report")],
        capture_output=True, text=True, env={**os.environ, "PYTHON": "/bin/false"},
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: /bin/false cannot import torch: run the GPU check with the Python that has "
        f"torch (PYTHON=/path/to/python {REPO / 'scripts' / 'gpu_check.sh'})"
    ]


CPU_CASES = {"cifar_32": (GpuCase("swin_lightning"), GpuCase("timm"),
                          GpuCase("timm", fused=True), GpuCase("torchvision"))}  # fmt: skip


@pytest.fixture(scope="module")
def cpu_rows():
    """Table 8's rows measured on the CPU (the GPU's code path, tiny shapes)."""
    return bench_gpu("cpu", shapes=("cifar_32",), train_batch=4, infer_batch=8, rounds=1,
                     peak=1.0, cases=CPU_CASES)  # fmt: skip


def test_gpu_rows_measure_every_case_against_timm(cpu_rows):
    assert [r["case"] for r in cpu_rows] == [
        "swin_lightning", "timm", "timm, fused attention", "torchvision"]  # fmt: skip
    by_case = {r["case"]: r for r in cpu_rows}
    assert by_case["timm"]["train_vs_timm"] == 1.0 and by_case["timm"]["infer_vs_timm"] == 1.0
    ours = by_case["swin_lightning"]
    assert ours["train_img_s"] > 0 and ours["infer_img_s"] > 0 and ours["warmup_s"] > 0
    assert ours["train_vs_timm_compiled"] is None  # no compiled timm row in this run
    assert ours["mfu"] > 0 and ours["peak_mb"] is None  # no CUDA: no CUDA peak
    fused = build_case(GpuCase("timm", fused=True), "cifar", "cpu")
    flags = [m.fused_attn for m in fused.modules() if hasattr(m, "fused_attn")]
    assert flags and all(flags)
    lines = gpu_table(cpu_rows)
    assert lines[0].startswith("| shape | implementation | train img/s |")
    assert len(lines) == 2 + len(cpu_rows)


def test_compiled_rows_past_the_time_budget_are_skipped_rows():
    cases = {"cifar_32": (GpuCase("swin_lightning", compile="full"), GpuCase("timm"),
                          GpuCase("timm", compile="full"))}  # fmt: skip
    rows = bench_gpu("cpu", shapes=("cifar_32",), train_batch=2, infer_batch=2, rounds=1,
                     budget_s=0.0, cases=cases)  # fmt: skip
    skipped = {r["case"]: r.get("skipped") for r in rows}
    assert skipped == {"swin_lightning, compiled full": "time budget of 0 s spent",
                       "timm, compiled full": "time budget of 0 s spent", "timm": None}  # fmt: skip
    table = "\n".join(gpu_table(rows))
    assert "| swin_lightning, compiled full | skipped: time budget of 0 s spent |" in table


def test_fit_throughput_is_the_median_after_the_warm_up(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for step, value in [(5, 10.0), (10, 20.0), (25, 900.0), (30, 1000.0), (35, 1100.0)]:
        writer.add_scalar("train/device/samples_per_sec", value, step)
    writer.close()
    assert fit_throughput(tmp_path, skip_steps=20) == {
        "img_s": 1000.0, "windows": 3, "last_step": 35}  # fmt: skip


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.gpu.test_numerics" name="test_a" time="1.0"/>
<testcase classname="tests.gpu.test_numerics" name="test_b" time="1.0">
<failure message="AssertionError: assert 0.3 &gt; 0.35&#10;more">trace</failure></testcase>
<testcase classname="tests.gpu.test_runs" name="test_c" time="0.1"><skipped message="x"/>
</testcase><testcase time="0.000" /></testsuite></testsuites>"""  # the last: interrupted


def test_report_from_what_the_steps_left(tmp_path, cpu_rows, capsys):
    env = {"date": "2026-12-04 17:00 UTC", "gpu": "NVIDIA H200", "gpu_memory_gib": 139.8,
           "gpus": 1, "capability": "9.0", "driver": "580.159.04", "cuda": "13.0",
           "cudnn": 91300, "python": "3.12.3", "torch": "2.11.0", "torchvision": "0.26.0",
           "lightning": "2.6.6", "timm": "1.0.31", "cpus": 16}  # fmt: skip
    compiled = {**cpu_rows[0], "case": "swin_lightning, compiled full", "shape": "swin_t_224",
                "train_img_s": 2000.0}  # fmt: skip
    files = {
        "env.json": json.dumps(env),
        "phases.json": json.dumps({"tests": {"exit_code": 1, "seconds": 150},
                                   "bench": {"exit_code": 124, "seconds": 170},
                                   "fit": {"exit_code": 0, "seconds": 120}}),
        "gpu_tests.xml": JUNIT,
        "bench_results.json": json.dumps({"gpu": [*cpu_rows, compiled]}),
        "fit.json": json.dumps({"command": "--config x.yaml", "exit_code": 0, "img_s": 1800.0,
                                "windows": 30, "last_step": 400}),
    }  # fmt: skip
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert check_main(["report", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# GPU check\n\n- 2026-12-04 17:00 UTC: NVIDIA H200 (139.8 GiB")
    for line in ("| step tests | exit 1 (150 s) |", "| step bench | timed out (170 s) |",
                 "| gpu tests | 1 passed, 1 failed, 1 skipped |",
                 "| failed: tests.gpu.test_numerics::test_b | AssertionError: assert 0.3 > 0.35 |",
                 "| fit Swin-T 224 end to end | 1800 img/s (90% of the raw compiled step) |"):  # fmt: skip
        assert line in md and line in printed, line
    assert printed.rstrip().endswith("(90% of the raw compiled step) |")  # the summary is last
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["tests"]["failed"] == 1 and saved["fit"]["img_s"] == 1800.0
    assert saved["environment"]["gpu"] == "NVIDIA H200"


def test_report_of_a_check_that_stopped_early(tmp_path, capsys):
    # Only the environment step ran; a damaged test file is reported, not a traceback.
    (tmp_path / "gpu_tests.xml").write_text("<testsuites><testsuite")
    assert check_main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "| gpu tests | unreadable gpu_tests.xml:" in md
    assert "## Benchmark rows" not in md and "end to end" not in md


def test_the_check_fit_is_the_swin_t_recipe_compiled_in_bf16(tmp_path):
    from swin_lightning.bench.gpu_check import fit_args
    from swin_lightning.cli import resolved_settings

    settings = resolved_settings(fit_args(tmp_path / "data", tmp_path / "logs", 90, 14))
    trainer, model, data = settings["trainer"], settings["model"], settings["data"]
    assert (trainer["accelerator"], trainer["precision"], trainer["max_time"]) == (
        "gpu", "bf16-mixed", "00:00:01:30")  # fmt: skip
    assert trainer["limit_val_batches"] == 0 and model["compile"] == "full"
    assert model["net"]["init_args"]["embed_dim"] == 96 and model["mixup_alpha"] == 0.8
    assert data["init_args"]["root"] == str(tmp_path / "data")
    assert data["init_args"]["num_workers"] == 14 and data["init_args"]["batch_size"] == 128


def test_an_interrupted_warm_up_keeps_the_rows_already_measured(monkeypatch):
    # SIGINT from the check's time limit during a compile: the warm cases are still timed,
    # the rest are rows that say they were cut.
    from swin_lightning.bench import gpu

    real = gpu.step_fns
    calls = {"n": 0}

    def step_fns(model, x, y, dtype):
        forward, train = real(model, x, y, dtype)
        calls["n"] += 1
        if calls["n"] == 3:  # the second case's train step (two calls per case)

            def train():
                raise KeyboardInterrupt

        return forward, train

    monkeypatch.setattr(gpu, "step_fns", step_fns)
    rows = bench_gpu("cpu", shapes=("cifar_32",), train_batch=2, infer_batch=2, rounds=1,
                     cases=CPU_CASES)  # fmt: skip
    by_case = {r["case"]: r for r in rows}
    assert by_case["swin_lightning"]["train_img_s"] > 0
    assert [by_case[c].get("skipped") for c in ("timm", "timm, fused attention", "torchvision")] == [
        "interrupted by the time limit"] * 3  # fmt: skip
