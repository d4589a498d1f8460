"""The benchmark runs end to end (quick mode) and its harness measures what it says."""

from __future__ import annotations

import json
import time

import pytest
import torch

from swin_lightning.bench import (
    GPU_VARIANTS,
    Variant,
    bench_models,
    fit_exponent,
    interleaved,
    main,
    peak_memory_mb,
    peak_tflops,
    train_flops_per_image,
)
from swin_lightning.bench.breakdown import BUCKET_NAMES, bench_breakdown, bucket_of
from swin_lightning.bench.models import MLP_IMPL


def test_interleaved_reports_medians_per_case():
    calls = []
    cases = {
        "fast": lambda: calls.append("fast"),
        "slow": lambda: (time.sleep(0.01), calls.append("slow")),
    }
    medians = interleaved(cases, rounds=4, warmup=1)
    assert medians["slow"] > 0.009 > medians["fast"]
    # warm-up, then alternating order: fast slow | slow fast | fast slow ...
    assert calls[2:6] == ["fast", "slow", "slow", "fast"]


def test_interleaved_self_timed_cases_report_their_own_figures():
    figures = iter([9.0, 1.0, 2.0, 3.0, 4.0, 5.0])  # the first call is the warm-up
    medians = interleaved({"run": lambda: next(figures)}, rounds=5, warmup=1, self_timed=True)
    assert medians == {"run": 3.0}


def test_fit_exponent():
    xs = [1.0, 4.0, 16.0]
    assert fit_exponent(xs, [3 * x for x in xs]) == pytest.approx(1.0)
    assert fit_exponent(xs, [x**2 for x in xs]) == pytest.approx(2.0)


@pytest.mark.slow
def test_bench_quick_writes_report(tmp_path):
    out = tmp_path / "docs" / "benchmarks.md"
    assert main(["--quick", "--out", str(out), "--peak_tflops", "1"]) == 0
    text = out.read_text()
    assert "| peak MB fwd+bwd | MFU |" in text and "/ 1 TFLOP/s" in text
    for heading in (
        "## 1. Model throughput",
        "## 2. Framework overhead",
        "## 3. Scaling",
        "## 4. Input pipeline",
        "## 6. torch.compile (eager;",
        "## 7. Where a train step's time goes",
        "## 8. GPU: bf16 training and inference",
    ):
        assert heading in text
    assert "Not run: it needs a CUDA device" in text  # the GPU rows: scripts/gpu_check.sh
    results = json.loads((out.parent / "bench_results.json").read_text())
    impls = {(r["shape"], r["impl"]) for r in results["models"]}
    assert {
        ("swin_t_224", "timm"),
        ("cifar_32", "torchvision"),
        ("cifar_32", "swin_lightning"),
        ("swinv2_t_256", "swin_lightning"),
        ("swinv2_t_256", "timm"),
        ("swinv2_t_256", "torchvision"),
        ("cifar_32", MLP_IMPL),  # the MLP mixer at the V1 shapes (no V2 Swin-MLP exists)
    } <= impls and ("swinv2_t_256", MLP_IMPL) not in impls
    assert all(r["train_img_s"] > 0 and r["fwd_img_s"] > 0 for r in results["models"])
    assert all(r["mfu"] > 0 for r in results["models"])
    assert {r["variant"] for r in results["models"]} == {"fp32", "bf16"}  # bf16 rows on CPU
    compiled = {r["model"]: r for r in results["compile"]}
    assert set(compiled) == {"swin_lightning, full", "swin_lightning, regional", "timm, full",
                             "swin_lightning, eager", "timm, eager"}  # fmt: skip
    assert compiled["timm, full"]["vs_timm_compiled"] == 1.0
    assert all(compiled[k]["warmup_s"] > 0 for k in ("swin_lightning, full", "timm, full"))
    assert set(results["overhead_s_per_step"]) == {
        "plain PyTorch loop",
        "Trainer.fit, same work",
        "Trainer.fit, SwinClassifier (metrics, logging)",
    }
    msa = {r["size"]: r["gmacs"] for r in results["scaling"] if r["net"].startswith("MSA")}
    wmsa = {r["size"]: r["gmacs"] for r in results["scaling"] if r["net"].startswith("W-MSA")}
    assert wmsa[112] / wmsa[56] < 4.6 < msa[112] / msa[56]  # linear against quadratic
    assert (out.parent / "bench_scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert {(r["shape"], r["impl"]) for r in results["breakdown"]} == {
        ("cifar_32", "swin_lightning"),
        ("cifar_32", "timm"),
    }
    assert "ceiling" in text
    loaders = {(r["source"], r["decode"]) for r in results["pipeline"]}
    assert loaders == {("ImageFolder", "pil"), ("ImageFolder", "tensor"), ("packed", "pil"),
                       ("packed", "tensor")}  # fmt: skip
    assert all(r["img_s"] > 0 for r in results["pipeline"])


def test_operators_fall_in_their_buckets():
    for op, bucket in [("aten::addmm", "matmul"), ("aten::mm", "matmul"), ("aten::bmm", "matmul"),
                       ("aten::convolution_backward", "matmul"), ("aten::gelu_backward", "gelu"),
                       ("aten::native_layer_norm_backward", "layernorm"),
                       ("aten::_softmax_backward_data", "softmax"), ("aten::copy_", "data movement"),
                       ("aten::roll", "data movement"), ("aten::index_select", "data movement"),
                       ("aten::mul", "other"), ("aten::sum", "other")]:  # fmt: skip
        assert bucket_of(op) == bucket, op


def test_breakdown_buckets_add_up_and_matmuls_dominate():
    rows = bench_breakdown({"cifar_32": 4}, {"fp32": None}, steps=1)
    assert [r["impl"] for r in rows] == ["swin_lightning", "timm"]
    for r in rows:
        ms = r["ms"]
        assert sum(ms[b] for b in BUCKET_NAMES) == pytest.approx(ms["total"])
        assert all(ms[b] >= 0 for b in BUCKET_NAMES) and ms["matmul"] > 0
        # The linear layers are most of a Swin step; a bucketing bug would lose them.
        assert r["matmul_share"] > 0.3
    timm = rows[1]
    assert rows[0]["ceiling_vs_timm"] == pytest.approx(timm["ms"]["total"] / timm["ms"]["matmul"])


def test_peak_memory_grows_with_the_batch():
    # Measured in a fresh process; a fork would inherit this process's peak (a real bug once).
    small = peak_memory_mb("swin_lightning", "cifar_32", 2, "cpu", train=True)
    large = peak_memory_mb("swin_lightning", "cifar_32", 64, "cpu", train=True)
    assert 0 < small < large


def test_gpu_variants_run_on_the_cpu_too():
    # The GPU report's bf16 and channels-last rows, exercised here at a tiny size.
    variant = Variant("bf16+channels_last", torch.bfloat16, channels_last=True)
    rows = bench_models("cpu", 1, {"cifar_32": 2}, variants=[variant], shapes=["cifar_32"])
    assert {r["impl"] for r in rows} == {"swin_lightning", "timm", "torchvision", MLP_IMPL}
    assert all(r["variant"] == variant.name and r["train_img_s"] > 0 for r in rows)
    assert next(r for r in rows if r["impl"] == "timm")["train_vs_timm"] == 1.0


def test_gpu_rows_compiled_against_compiled_with_mfu():
    # The GPU report's compiled bf16 rows (dynamo's eager backend here) and the MFU column:
    # both models compiled, the ratio against compiled timm, MFU from model FLOPs and a peak.
    variant = next(v for v in GPU_VARIANTS if v.compile)
    rows = bench_models("cpu", 1, {"cifar_32": 2}, variants=[variant], shapes=["cifar_32"],
                        peak=1.0, compile_backend="eager")  # fmt: skip
    assert {r["impl"] for r in rows} == {"swin_lightning (compiled)", "timm (compiled)",
                                         f"{MLP_IMPL} (compiled)"}  # fmt: skip
    flops = train_flops_per_image("cifar", 32)
    mlp_flops = train_flops_per_image("cifar", 32, MLP_IMPL)  # the MLP mixer's own FLOPs
    assert mlp_flops < flops
    for r in rows:
        own = mlp_flops if r["impl"].startswith(MLP_IMPL) else flops
        assert r["mfu"] == pytest.approx(own * r["train_img_s"] / 1e12)
    assert next(r for r in rows if r["impl"] == "timm (compiled)")["train_vs_timm"] == 1.0


def test_peak_tflops_from_the_table_or_the_flag(monkeypatch):
    assert peak_tflops("cpu") is None and peak_tflops("cpu", 50.0) == 50.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in [("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 80GB HBM3", 989.4),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("Some Other GPU", None)]:  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda n=name: n)
        assert peak_tflops("cuda") == peak, name


def test_tables_reruns_one_table_and_keeps_the_others(tmp_path):
    out = tmp_path / "benchmarks.md"
    old = {n: f"## {n}. Table {n}\n\nold figures {n}\n\n" for n in range(1, 8)}
    out.write_text("# Benchmarks\n\nCommand: `full run`\n\n" + "".join(old.values()))
    (tmp_path / "bench_results.json").write_text(json.dumps({"models": ["kept"]}))
    assert main(["--quick", "--out", str(out), "--tables", "5"]) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nCommand: `full run`")
    for n in (1, 2, 3, 4, 6, 7):
        assert old[n] in text
    assert "old figures 5" not in text and "## 5. Attention kernels" in text
    assert text.index("## 4.") < text.index("## 5. Attention") < text.index("## 6.")
    assert "Re-run alone by `python -m swin_lightning bench --quick" in text
    results = json.loads((tmp_path / "bench_results.json").read_text())
    assert results["models"] == ["kept"] and results["attention"]
