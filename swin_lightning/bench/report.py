"""``python -m swin_lightning bench``: speed against timm, torchvision and a plain loop.

Runs every table (one module each in this package) and writes the markdown report.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from swin_lightning.bench.attention import bench_attention
from swin_lightning.bench.breakdown import BUCKET_NAMES, bench_breakdown
from swin_lightning.bench.compile import bench_compile
from swin_lightning.bench.harness import machine, md_row
from swin_lightning.bench.models import (
    CPU_VARIANTS,
    GPU_PEAK_BF16_TFLOPS,
    bench_models,
    peak_memory_mb,
    peak_tflops,
)
from swin_lightning.bench.overhead import bench_overhead
from swin_lightning.bench.pipeline import bench_input_pipeline
from swin_lightning.bench.scaling import bench_scaling, fit_exponent, plot_scaling
from swin_lightning.storage import write_text

MODEL_COLUMNS = ("shape", "batch", "precision", "implementation", "forward", "fwd+bwd",
                 "fwd vs timm", "fwd+bwd vs timm", "peak MB fwd+bwd")  # fmt: skip


def table_models(args: argparse.Namespace, out_dir: Path) -> tuple[list[str], Any]:
    quick, device = args.quick, args.device
    batches = {
        "swin_t_224": 1 if quick else 4,
        "cifar_32": 16 if quick else 32,
        "swinv2_t_256": 1 if quick else 4,
    }
    peak = peak_tflops(device, args.peak_tflops)
    # --quick: one call per case and no warm-up, enough to fill and check the table (its
    # figures include first-call costs: not for comparing).
    rounds, warmup = (1, 0) if quick else (7, 2)
    if quick and device == "cpu":  # bf16 only at the smallest shape: it costs most on a CPU
        fp32, bf16 = CPU_VARIANTS
        rows = bench_models(device, rounds, batches, [fp32], peak=peak, warmup=warmup)
        rows += bench_models(device, rounds, batches, [bf16], ["cifar_32"], peak, warmup=warmup)
    else:
        rows = bench_models(device, rounds, batches=batches, peak=peak, warmup=warmup)
    mfu_head = ["MFU"] if peak else []
    md = [
        "## 1. Model throughput (images/s; ratio = project / timm)",
        "",
        "`swin_lightning (mlp mixer)`: the same network with Swin-MLP's spatial MLP in place of"
        " window attention (`model.net.mixer: mlp`; fewer parameters and FLOPs, so its ratio to"
        " timm's attention model is a speed-up of the architecture, not of the code).",
        "",
        *(
            [f"MFU: model FLOPs per training image (3x forward) x images/s / {peak:g} TFLOP/s."]
            if peak
            else []
        ),
        "",
        md_row([*MODEL_COLUMNS, *mfu_head]),
        "|" + "---|" * (len(MODEL_COLUMNS) + len(mfu_head)),
    ]
    for r in rows:
        mem = "n/a"
        if r["peak_mb"] is not None:
            mem = f"{r['peak_mb']:.0f}"
        elif r["variant"] == "fp32" and not quick:
            mem = f"{peak_memory_mb(r['impl'], r['shape'], r['batch'], device, True):.0f}"
        mfu = [f"{100 * r['mfu']:.1f}%"] if peak else []
        cells = [r["shape"], str(r["batch"]), r["variant"], r["impl"], f"{r['fwd_img_s']:.1f}",
                 f"{r['train_img_s']:.1f}", f"{r['fwd_vs_timm']:.2f}x",
                 f"{r['train_vs_timm']:.2f}x", mem, *mfu]  # fmt: skip
        md.append(md_row(cells))
    return md, rows


def table_overhead(args: argparse.Namespace, out_dir: Path) -> tuple[list[str], Any]:
    quick = args.quick
    steps = 10 if quick else 30
    overhead = bench_overhead(rounds=1 if quick else 5, steps=steps, warmup=0 if quick else 1)
    plain = overhead["plain PyTorch loop"]
    md = [
        "## 2. Framework overhead (demo shape: 32x32, batch 64, 301 K-parameter Swin, AdamW)",
        "",
        "| loop | ms per step | vs plain loop |",
        "|---|---|---|",
    ]
    for name, sec in overhead.items():
        md.append(f"| {name} | {1000 * sec:.1f} | {100 * (sec / plain - 1):+.1f}% |")
    return md, overhead


def table_scaling(args: argparse.Namespace, out_dir: Path) -> tuple[list[str], Any]:
    quick = args.quick
    sizes = [56, 112] if quick else [56, 112, 224]
    scaling = bench_scaling(sizes, rounds=3 if quick else 5)
    plot_scaling(scaling, out_dir / "bench_scaling.png")
    md = [
        "## 3. Scaling with image size (2 stages, depths 2-2, forward, batch 2)",
        "",
        "| pixels | tokens (stage 1) | network | ms per image | GMACs per image |",
        "|---|---|---|---|---|",
    ]
    for r in scaling:
        md.append(
            f"| {r['size']}x{r['size']} | {r['tokens']} | {r['net']} | {r['ms_per_image']:.1f} | {r['gmacs']:.3f} |"
        )
    md.append("")
    for name in dict.fromkeys(r["net"] for r in scaling):
        sel = [r for r in scaling if r["net"] == name]
        px = [r["size"] ** 2 for r in sel]
        t_exp = fit_exponent(px, [r["ms_per_image"] for r in sel])
        f_exp = fit_exponent(px, [r["gmacs"] for r in sel])
        ratio = sel[-1]["ms_per_image"] / sel[-2]["ms_per_image"]
        md.append(
            f"- {name}: time ~ pixels^{t_exp:.2f}, MACs ~ pixels^{f_exp:.2f}; "
            f"{ratio:.2f}x the time at 4x the pixels ({sel[-2]['size']} -> {sel[-1]['size']})"
        )
    md += ["", "![scaling](bench_scaling.png)"]
    return md, scaling


def table_pipeline(args: argparse.Namespace, out_dir: Path) -> tuple[list[str], Any]:
    quick = args.quick
    pipeline = bench_input_pipeline(
        32 if quick else 256,
        [0] if quick else [0, 1, 2],
        rounds=1 if quick else 3,
        warmup=0 if quick else 1,
    )
    kb = pipeline[0]["mean_jpeg_kb"]
    md = [
        "## 4. Input pipeline (train loaders, RandAugment m9 + random erasing, 224 crops, "
        f"JPEG 500x375, {kb:.0f} KB on average)",
        "",
        "Loose JPEGs (ImageFolder) or packed chunks (`pack`, litdata); decoded by PIL with timm's"
        " transforms or by torchvision to tensors with transforms v2 (`data.decode`).",
        "",
        "Images/s are counted after each pass's first batch; the seconds to that batch (worker"
        " start, first reads) are their own column. The tensor rows' workers hand over uint8"
        " crops; normalising and random erasing them (on the device in training) run here in"
        " the main process, on the CPU, and are timed with the rest.",
        "",
        "| workers | source | decode | first batch s | images/s | images/s per worker "
        "| vs ImageFolder + PIL |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in pipeline:
        label = "0 (main process)" if r["workers"] == 0 else str(r["workers"])
        md.append(
            f"| {label} | {r['source']} | {r['decode']} | {r['first_batch_s']:.2f} | "
            f"{r['img_s']:.1f} | "
            f"{r['img_s_per_worker']:.1f} | {r['vs_imagefolder_pil']:.2f}x |"
        )
    return md, pipeline


def table_attention(args: argparse.Namespace, out_dir: Path) -> tuple[list[str], Any]:
    attention = bench_attention(rounds=3 if args.quick else 9, device=args.device)
    md = [
        "## 5. Attention kernels (one SW-MSA call: bias + shift mask as one additive tensor)",
        "",
        "In training the additive tensor needs a gradient. `attend` uses fused SDPA except"
        " in that case on the CPU, where the explicit kernel is faster.",
        "",
        "| block shape | pass | kernel | ms per call | vs SDPA |",
        "|---|---|---|---|---|",
    ]
    for r in attention:
        sdpa = next(
            a["ms"]
            for a in attention
            if (a["shape"], a["mode"], a["kernel"]) == (r["shape"], r["mode"], "SDPA")
        )
        md.append(
            f"| {r['shape']} | {r['mode']} | {r['kernel']} | {r['ms']:.2f} | {sdpa / r['ms']:.2f}x |"
        )
    return md, attention


def table_compile(args: argparse.Namespace, out_dir: Path) -> tuple[list[str], Any]:
    quick, device = args.quick, args.device
    backend = "eager" if quick else "inductor"
    compiled = bench_compile(
        device, "cifar_32", 8 if quick else 32, rounds=1 if quick else 7, backend=backend
    )
    md = [
        f"## 6. torch.compile ({backend}; train step, cifar_32; warm-up = first step, cold cache)",
        "",
        "| model | batch | images/s | vs timm compiled | vs its eager | warm-up s |",
        "|---|---|---|---|---|---|",
    ]
    for r in compiled:
        warm = "" if r["warmup_s"] is None else f"{r['warmup_s']:.1f}"
        md.append(
            f"| {r['model']} | {r['batch']} | {r['train_img_s']:.1f} | "
            f"{r['vs_timm_compiled']:.2f}x | {r['vs_own_eager']:.2f}x | {warm} |"
        )
    return md, compiled


def table_breakdown(args: argparse.Namespace, out_dir: Path) -> tuple[list[str], Any]:
    quick = args.quick
    breakdown = bench_breakdown(
        {"cifar_32": 8} if quick else {"cifar_32": 32, "swin_t_224": 4},
        {"fp32": None} if quick else {"fp32": None, "bf16": torch.bfloat16},
        steps=1 if quick else 3,
    )
    md = [
        "## 7. Where a train step's time goes (CPU, torch.profiler; ms per step)",
        "",
        "Matrix products (linear layers, attention matmuls, patch-embedding convolution) are the"
        " same FLOPs in both models. With equal matrix time, the most any implementation can"
        " gain on timm (the ceiling: everything else free) is timm's total over timm's matrix"
        " time.",
        "",
        md_row(["shape", "precision", "implementation", *BUCKET_NAMES, "total", "matmul share"]),
        "|" + "---|" * (len(BUCKET_NAMES) + 5),
    ]
    for r in breakdown:
        cells = [f"{r['ms'][b]:.1f}" for b in (*BUCKET_NAMES, "total")]
        share = f"{100 * r['matmul_share']:.0f}%"
        md.append(md_row([r["shape"], r["precision"], r["impl"], *cells, share]))
    md.append("")
    for r in breakdown:
        if r["impl"] == "timm":
            md.append(
                f"- {r['shape']} {r['precision']}: ceiling {r['ceiling_vs_timm']:.2f}x timm "
                f"(timm's matrix products are {100 * r['matmul_share']:.0f}% of its step)"
            )
    return md, breakdown


def table_gpu(args: argparse.Namespace, out_dir: Path) -> tuple[list[str], Any]:
    from swin_lightning.bench.gpu import bench_gpu, gpu_table

    heading = "## 8. GPU: bf16 training and inference against timm and torchvision"
    if args.device != "cuda":
        return [heading, "", "Not run: it needs a CUDA device (`--device cuda`)."], []
    peak = peak_tflops(args.device, args.peak_tflops)
    train_batch, infer_batch = (32, 64) if args.quick else (128, 256)
    rows = bench_gpu(args.device, train_batch=train_batch, infer_batch=infer_batch,
                     rounds=3 if args.quick else 7, budget_s=args.gpu_budget_s, peak=peak)  # fmt: skip
    md = [
        heading,
        "",
        f"Training batch {train_batch} (forward + backward), inference batch {infer_batch}, "
        "bf16 autocast; warm-up: the first train step and inference from cold, compile "
        "included. Ratio: the row's images/s over timm's."
        + (f" MFU: model FLOPs (3x forward) x images/s / {peak:g} TFLOP/s." if peak else ""),
        "",
        *gpu_table(rows),
    ]
    return md, rows


# Table number -> (results key in bench_results.json, function writing it).
TABLES: dict[int, tuple[str, Callable[[argparse.Namespace, Path], tuple[list[str], Any]]]] = {
    1: ("models", table_models),
    2: ("overhead_s_per_step", table_overhead),
    3: ("scaling", table_scaling),
    4: ("pipeline", table_pipeline),
    5: ("attention", table_attention),
    6: ("compile", table_compile),
    7: ("breakdown", table_breakdown),
    8: ("gpu", table_gpu),
}
_HEADING = re.compile(r"^## (\d+)\. ", re.MULTILINE)


def split_sections(text: str) -> tuple[str, dict[int, str]]:
    """A report's preamble and its ``## N.`` sections by table number."""
    starts = [(m.start(), int(m.group(1))) for m in _HEADING.finditer(text)]
    if not starts:
        return text, {}
    sections = {}
    for (pos, num), nxt in zip(starts, [*(s for s, _ in starts[1:]), len(text)], strict=True):
        sections[num] = text[pos:nxt]
    return text[: starts[0][0]], sections


def run(args: argparse.Namespace) -> str:
    """Run the tables ``args.tables`` (all when empty) and write the report. With a subset,
    an existing report keeps its other tables and says which ones this command re-ran."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tables = sorted(set(args.tables or TABLES))
    started = time.perf_counter()
    partial = len(tables) < len(TABLES) and out.is_file()
    results_path = out.parent / "bench_results.json"
    results = json.loads(results_path.read_text()) if partial and results_path.is_file() else {}
    preamble, sections = split_sections(out.read_text()) if partial else ("", {})
    for num in tables:
        key, table = TABLES[num]
        md, results[key] = table(args, out.parent)
        if partial:
            md += ["", f"Re-run alone by `{args.command}` on {time.strftime('%Y-%m-%d')}."]
        sections[num] = "\n".join(md) + "\n\n"
    if not partial:
        took = f"{time.perf_counter() - started:.0f} s"
        preamble = "\n".join(
            ["# Benchmarks", "", f"Command: `{args.command}` ({took})", "", machine(),
             "Every comparison runs in one process, interleaved, after warm-up; figures are "
             "medians.", "", ""]
        )  # fmt: skip
    text = preamble + "".join(sections[n] for n in sorted(sections))
    write_text(out, text)
    write_text(results_path, json.dumps(results, indent=1))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m swin_lightning bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", default="docs/benchmarks.md", help="markdown report path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and sizes (for tests)")
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="dense bf16 peak of the device in TFLOP/s for the MFU column (default: from a "
        "table of known GPUs: " + ", ".join(GPU_PEAK_BF16_TFLOPS) + ")",
    )
    parser.add_argument(
        "--tables",
        type=int,
        nargs="+",
        choices=sorted(TABLES),
        default=None,
        help="run only these tables and replace them in an existing report (default: all)",
    )
    parser.add_argument(
        "--gpu_budget_s",
        type=float,
        default=240.0,
        help="table 8: start no new case (most are compiles) after this many seconds",
    )
    args = parser.parse_args(argv)
    args.command = "python -m swin_lightning bench " + " ".join(
        argv if argv is not None else sys.argv[2:]
    )
    print(run(args))
    return 0
