"""Table 6: ``torch.compile`` (full and regional) against timm compiled, with warm-up."""

from __future__ import annotations

import tempfile
import time

import torch
from torch import nn

from swin_lightning.bench.harness import interleaved, sync_device
from swin_lightning.bench.models import SHAPES, build_model, step_fns

COMPILED = {
    "swin_lightning, full": ("swin_lightning", "full"),
    "swin_lightning, regional": ("swin_lightning", "regional"),
    "timm, full": ("timm", "full"),
}


def bench_compile(
    device: str,
    shape_name: str,
    batch: int,
    rounds: int,
    dtype: torch.dtype | None = None,
    backend: str = "inductor",
) -> list[dict]:
    """``torch.compile`` against eager, ours and timm's, one train step each.

    Warm-up is the first step's wall time from a cold start: each model compiles in a fresh,
    empty inductor cache (no kernel built for an earlier model is reused) with the FX-graph
    and AOT-autograd caches off, after a tiny model has paid the process's one-time start-up
    (imports, compiler checks, worker pool), so the order of the models does not matter.
    Throughput is measured interleaved afterwards, with the eager models.
    ``backend='eager'`` (``--quick``) only exercises the path: dynamo without code generation.
    """
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    import torch._inductor.utils as inductor_utils

    from swin_lightning.models import compile_network

    shape, size = SHAPES[shape_name]
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    saved = inductor_config.fx_graph_cache, functorch_config.enable_autograd_cache
    inductor_config.fx_graph_cache = functorch_config.enable_autograd_cache = False
    torch._dynamo.reset()
    fresh_cache = (
        getattr(inductor_utils, "fresh_cache", None) or inductor_utils.fresh_inductor_cache
    )
    try:
        with tempfile.TemporaryDirectory(prefix="bench_compile_") as caches:
            prime = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2)).to(device)
            prime.compile(backend=backend)
            with fresh_cache(dir=caches, delete=False):
                step_fns(prime, torch.randn(4, 8, device=device), y[:4] % 2, dtype)[1]()
            steps, warmup = {}, {}
            for label, (impl, how) in COMPILED.items():
                model = build_model(impl, shape).to(device)
                if impl == "swin_lightning":
                    compile_network(model, how, backend=backend)
                else:
                    model.compile(backend=backend)
                step = step_fns(model, x, y, dtype)[1]
                with fresh_cache(dir=caches, delete=False):
                    sync_device()
                    start = time.perf_counter()
                    step()
                    sync_device()
                    warmup[label] = time.perf_counter() - start
                steps[label] = step
        for impl in ("swin_lightning", "timm"):
            steps[f"{impl}, eager"] = step_fns(build_model(impl, shape).to(device), x, y, dtype)[1]
        times = interleaved(steps, rounds)
    finally:
        inductor_config.fx_graph_cache, functorch_config.enable_autograd_cache = saved
        torch._dynamo.reset()
    rows = []
    for label, sec in times.items():
        impl = label.split(",")[0]
        rows.append(
            {
                "shape": shape_name,
                "batch": batch,
                "precision": "fp32" if dtype is None else "bf16 autocast",
                "model": label,
                "train_img_s": batch / sec,
                "vs_timm_compiled": times["timm, full"] / sec,
                "vs_own_eager": times[f"{impl}, eager"] / sec,
                "warmup_s": warmup.get(label),
            }
        )
    return rows
