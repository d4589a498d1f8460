"""Table 3: time and MACs against image size, windowed against global attention."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch

from swin_lightning.bench.harness import interleaved
from swin_lightning.storage import save_figure


def bench_scaling(sizes: list[int], rounds: int, batch: int = 2) -> list[dict]:
    """Forward time and MACs per image: windows of 7 (W-MSA) vs one window (global MSA)."""
    from swin_lightning.models import SwinTransformer, count_macs

    rows = []
    for size in sizes:
        grid = size // 4
        nets = {
            "W-MSA (window 7)": SwinTransformer(
                img_size=size, num_classes=0, depths=(2, 2), num_heads=(3, 6), window_size=7
            ),
            "MSA (global window)": SwinTransformer(
                img_size=size, num_classes=0, depths=(2, 2), num_heads=(3, 6), window_size=grid
            ),
        }
        x = torch.randn(batch, 3, size, size)

        def run(model, x=x):
            def fn():
                with torch.no_grad():
                    model.eval()(x)

            return fn

        times = interleaved({k: run(m) for k, m in nets.items()}, rounds, warmup=1)
        for name, model in nets.items():
            rows.append(
                {
                    "size": size,
                    "tokens": grid * grid,
                    "net": name,
                    "ms_per_image": 1000 * times[name] / batch,
                    "gmacs": count_macs(model, (3, size, size)) / 1e9,
                }
            )
    return rows


def fit_exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x): y ~ x^slope."""
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    cov = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True))
    return cov / sum((a - mx) ** 2 for a in lx)


def plot_scaling(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=110)
    ax_t, ax_f = fig.subplots(1, 2)
    for name in dict.fromkeys(r["net"] for r in rows):
        sel = [r for r in rows if r["net"] == name]
        pixels = [r["size"] ** 2 for r in sel]
        ax_t.loglog(pixels, [r["ms_per_image"] for r in sel], "o-", label=name)
        ax_f.loglog(pixels, [r["gmacs"] for r in sel], "o-", label=name)
    for ax, label in ((ax_t, "ms per image (forward, CPU)"), (ax_f, "GMACs per image")):
        ax.set_xlabel("pixels")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
