"""Table 7: where a training step's time goes, ours and timm's, from ``torch.profiler``.

Each aten operator's own (self) time is put in one bucket: matrix products (linear layers,
attention matmuls, the patch-embedding convolution; the same FLOPs in both models), GELU,
LayerNorm, softmax, data movement (copies, concatenation, window shuffles, casts) and the
rest. The matrix products are the same work in both models, so they bound the ratio: an
implementation whose everything else were free would take timm's matrix time, which makes
timm's total over timm's matrix time the ceiling of any speed-up on timm.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from swin_lightning.bench.models import SHAPES, build_model, step_fns

# Buckets by aten operator name (forward and backward kernels alike); the first match wins.
BUCKETS = (
    ("matmul", ("mm", "addmm", "bmm", "baddbmm", "addbmm", "linear", "matmul",
                "mkldnn_convolution", "convolution_backward", "_scaled_dot_product")),
    ("gelu", ("gelu",)),
    ("layernorm", ("native_layer_norm",)),
    ("softmax", ("_softmax",)),
    ("data movement", ("copy_", "cat", "stack", "clone", "roll", "index", "_to_copy",
                       "contiguous", "constant_pad_nd", "gather", "scatter")),
)  # fmt: skip
BUCKET_NAMES = (*(name for name, _ in BUCKETS), "other")


def bucket_of(op: str) -> str:
    """The bucket of an aten operator (``aten::addmm`` -> 'matmul')."""
    name = op.removeprefix("aten::")
    for bucket, prefixes in BUCKETS:
        if name.startswith(prefixes):
            return bucket
    return "other"


def profile_ms(step, ms: dict[str, float]) -> None:
    """Profile one call of ``step``; add each bucket's milliseconds (self time of aten
    operators) to ``ms``, and the self time of every event (Python and autograd too) to
    ``ms['total']``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    total = 0.0
    for event in prof.key_averages():
        self_ms = event.self_cpu_time_total / 1000
        total += self_ms
        bucket = bucket_of(event.key) if event.key.startswith("aten::") else "other"
        ms[bucket] = ms.get(bucket, 0.0) + self_ms
    ms["total"] = ms.get("total", 0.0) + total


def bench_breakdown(
    shapes: dict[str, int], dtypes: dict[str, torch.dtype | None], steps: int
) -> list[dict]:
    """One row per shape, precision and implementation (ours, timm): ms per train step in each
    bucket and the matmul share; steps of the two are profiled in turn (after a warm-up step
    each), so drift of the machine's speed hits both alike.

    ``ceiling_vs_timm``: equal matmul time being the same FLOPs, our step is at best that
    time, i.e. timm's total over timm's matmul time; reaching it needs everything else free.
    """
    rows = []
    for shape_name, batch in shapes.items():
        shape, size = SHAPES[shape_name]
        torch.manual_seed(0)
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, 10, (batch,))
        for precision, dtype in dtypes.items():
            impls = ("swin_lightning", "timm")
            train = {impl: step_fns(build_model(impl, shape), x, y, dtype)[1] for impl in impls}
            found = {impl: dict.fromkeys((*BUCKET_NAMES, "total"), 0.0) for impl in impls}
            for impl in impls:
                train[impl]()  # warm-up
            for i in range(steps):
                for impl in impls if i % 2 == 0 else reversed(impls):
                    profile_ms(train[impl], found[impl])
            ceiling = found["timm"]["total"] / found["timm"]["matmul"]
            for impl, ms in found.items():
                ms = {k: v / steps for k, v in ms.items()}
                rows.append(
                    {
                        "shape": shape_name,
                        "batch": batch,
                        "precision": precision,
                        "impl": impl,
                        "ms": ms,
                        "matmul_share": ms["matmul"] / ms["total"],
                        "ceiling_vs_timm": ceiling,
                    }
                )
    return rows
