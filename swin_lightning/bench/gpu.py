"""Table 8: the GPU rows. Swin-T 224 and V2-T 256 in bf16 at training batch >= 128 and
inference batch >= 256: ours eager, channels-last and compiled (full, regional), timm eager
and compiled (its default attention and its fused attention), torchvision; interleaved
medians, peak memory and MFU. Compiling is the slow part, so compiled cases start in order
of importance while a time budget lasts, and the rows that did not fit say so."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from swin_lightning.bench.harness import interleaved, sync_device
from swin_lightning.bench.models import (
    SHAPES,
    build_model,
    peak_cuda_mb,
    step_fns,
    train_flops_per_image,
)


@dataclass(frozen=True)
class GpuCase:
    """One row: an implementation and how it runs.

    ``compile``: 'none', 'full' or 'regional' (regional: ours only). ``fused``: timm's
    ``fused_attn`` switched on (timm's Swin V1 uses SDPA only when asked; ours always does).
    """

    impl: str
    compile: str = "none"
    channels_last: bool = False
    fused: bool = False

    @property
    def label(self) -> str:
        parts = [self.impl]
        if self.fused:
            parts.append("fused attention")
        if self.channels_last:
            parts.append("channels-last")
        if self.compile != "none":
            parts.append(f"compiled {self.compile}")
        return ", ".join(parts)


# In order of importance: eager rows first (cheap), then compiled rows, ours before timm's.
GPU_CASES = {
    "swin_t_224": (
        GpuCase("swin_lightning"),
        GpuCase("timm"),
        GpuCase("timm", fused=True),
        GpuCase("torchvision"),
        GpuCase("swin_lightning", channels_last=True),
        GpuCase("swin_lightning", compile="full"),
        GpuCase("timm", compile="full"),
        GpuCase("swin_lightning", compile="regional"),
        GpuCase("timm", compile="full", fused=True),
    ),
    "swinv2_t_256": (
        GpuCase("swin_lightning"),
        GpuCase("timm"),
        GpuCase("torchvision"),
        GpuCase("swin_lightning", compile="full"),
        GpuCase("timm", compile="full"),
    ),
}


def build_case(case: GpuCase, shape: str, device: str) -> nn.Module:
    """The case's network on ``device``, compiled as the case says (lazily: the first call
    compiles)."""
    from swin_lightning.models import compile_network

    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    model = build_model(case.impl, shape).to(device, memory_format=fmt)
    if case.fused:
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = True
    # Static shapes: training (batch 128) and inference (256) get a graph each, instead of a
    # dynamic-batch graph recompiled on the second shape.
    if case.impl == "swin_lightning":
        compile_network(model, case.compile, dynamic=False)
    elif case.compile == "full":
        model.compile(dynamic=False)
    elif case.compile != "none":
        raise ValueError(f"compile={case.compile!r}: regional compile is for ours only")
    return model


def bench_gpu(
    device: str = "cuda",
    shapes: tuple[str, ...] = ("swin_t_224", "swinv2_t_256"),
    train_batch: int = 128,
    infer_batch: int = 256,
    rounds: int = 5,
    budget_s: float = 240.0,
    peak: float | None = None,
    cases: dict[str, tuple[GpuCase, ...]] | None = None,
) -> list[dict]:
    """Rows of training and inference images/s per case, bf16 autocast.

    Each case warms up (compiles) alone, timed as ``warmup_s`` (its first train step and
    first inference from cold, compile included); then the cases of a shape are timed
    interleaved. A compiled case not started before ``budget_s`` (from the call) is a row
    with ``skipped`` set; eager cases always run (seconds each). A SIGINT during a warm-up
    (the GPU check's time limit) skips the cases left and times those already warm. With ``peak`` (dense bf16 TFLOP/s), each row has its MFU.
    """
    started = time.perf_counter()
    dtype = torch.bfloat16 if device == "cuda" else None
    rows: list[dict] = []
    interrupted = False  # SIGINT (the GPU check's time limit): report what was measured
    for shape_name in shapes:
        shape, size = SHAPES[shape_name]
        flops = train_flops_per_image(shape, size) if peak else None
        torch.manual_seed(0)
        x = torch.randn(train_batch, 3, size, size, device=device)
        y = torch.randint(0, 10, (train_batch,), device=device)
        xi = torch.randn(infer_batch, 3, size, size, device=device)
        train_fns, infer_fns, info = {}, {}, {}
        for case in (cases or GPU_CASES)[shape_name]:
            row = {"shape": shape_name, "case": case.label, "impl": case.impl,
                   "compile": case.compile, "train_batch": train_batch,
                   "infer_batch": infer_batch}  # fmt: skip
            if interrupted:
                rows.append({**row, "skipped": "interrupted by the time limit"})
                continue
            if case.compile != "none" and time.perf_counter() - started > budget_s:
                rows.append({**row, "skipped": f"time budget of {budget_s:.0f} s spent"})
                continue
            fmt = torch.channels_last if case.channels_last else torch.contiguous_format
            model = build_case(case, shape, device)
            xs, xis = x.contiguous(memory_format=fmt), xi.contiguous(memory_format=fmt)
            train = step_fns(model, xs, y, dtype)[1]
            infer = step_fns(model, xis, y, dtype)[0]
            t0 = time.perf_counter()
            try:
                train()
                infer()
                sync_device()
            except KeyboardInterrupt:
                interrupted = True
                rows.append({**row, "skipped": "interrupted by the time limit"})
                continue
            except Exception as err:  # a case that fails is a row that says why
                rows.append({**row, "skipped": f"{type(err).__name__}: {err}"[:300]})
                continue
            warmup = time.perf_counter() - t0
            memory = peak_cuda_mb(train)
            train_fns[case.label], infer_fns[case.label] = train, infer
            info[case.label] = {**row, "warmup_s": warmup, "peak_mb": memory}
        if not train_fns:
            continue
        timed_rounds = min(rounds, 3) if interrupted else rounds  # little time is left
        train_s = interleaved(train_fns, timed_rounds, warmup=1)
        infer_s = interleaved(infer_fns, timed_rounds, warmup=1)
        for label, row in info.items():
            img_s = train_batch / train_s[label]
            rows.append(
                {
                    **row,
                    "train_img_s": img_s,
                    "infer_img_s": infer_batch / infer_s[label],
                    **{
                        f"{kind}_vs_{key}": times[ref] / times[label] if ref in times else None
                        for kind, times in (("train", train_s), ("infer", infer_s))
                        for key, ref in (("timm", "timm"), ("timm_compiled", "timm, compiled full"))
                    },
                    "mfu": flops * img_s / (peak * 1e12) if peak else None,
                }
            )
        del train_fns, infer_fns
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


GPU_COLUMNS = ("shape", "implementation", "train img/s", "vs timm", "vs timm compiled",
               "inference img/s", "vs timm", "vs timm compiled", "peak MB (train)",
               "warm-up s", "MFU")  # fmt: skip


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def gpu_table(rows: list[dict]) -> list[str]:
    """Markdown rows of :func:`bench_gpu`'s results (skipped cases say why)."""
    from swin_lightning.bench.harness import md_row

    lines = [md_row(GPU_COLUMNS), "|" + "---|" * len(GPU_COLUMNS)]
    for r in rows:
        if r.get("skipped"):
            blank = [""] * (len(GPU_COLUMNS) - 3)
            lines.append(md_row([r["shape"], r["case"], f"skipped: {r['skipped']}", *blank]))
            continue
        memory = "n/a" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"
        mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        cells = [r["shape"], r["case"], f"{r['train_img_s']:.0f}", _ratio(r["train_vs_timm"]),
                 _ratio(r["train_vs_timm_compiled"]), f"{r['infer_img_s']:.0f}",
                 _ratio(r["infer_vs_timm"]), _ratio(r["infer_vs_timm_compiled"]), memory,
                 f"{r['warmup_s']:.1f}", mfu]  # fmt: skip
        lines.append(md_row(cells))
    return lines
