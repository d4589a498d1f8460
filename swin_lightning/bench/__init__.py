"""``python -m swin_lightning bench``: speed against timm, torchvision and a plain loop.

Every comparison runs in one process, side by side and interleaved (A B C, C B A, ...), after
warm-up, and reports medians, so ratios hold on a noisy machine. Peak memory is measured in a
fresh subprocess per case (peak RSS above the process's baseline on CPU; the CUDA allocator's
peak on a GPU). Writes a markdown report (and a PNG of the scaling curves).

One module per table: ``models`` (1), ``overhead`` (2), ``scaling`` (3), ``pipeline`` (4),
``attention`` (5), ``compile`` (6), ``breakdown`` (7); ``harness`` holds the shared timing
helpers and ``report`` runs them all.
"""

from swin_lightning.bench.harness import interleaved, peak_rss_bytes
from swin_lightning.bench.models import (
    GPU_PEAK_BF16_TFLOPS,
    GPU_VARIANTS,
    SHAPES,
    Variant,
    bench_models,
    build_model,
    peak_memory_mb,
    peak_tflops,
    train_flops_per_image,
)
from swin_lightning.bench.report import main, run
from swin_lightning.bench.scaling import fit_exponent

__all__ = [
    "GPU_PEAK_BF16_TFLOPS",
    "GPU_VARIANTS",
    "SHAPES",
    "Variant",
    "bench_models",
    "build_model",
    "fit_exponent",
    "interleaved",
    "main",
    "peak_memory_mb",
    "peak_rss_bytes",
    "peak_tflops",
    "run",
    "train_flops_per_image",
]
