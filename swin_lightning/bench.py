"""``python -m swin_lightning bench``: speed against timm, torchvision and a plain loop.

Every comparison runs in one process, side by side and interleaved (A B C, C B A, ...), after
warm-up, and reports medians, so ratios hold on a noisy machine. Peak memory is measured in a
fresh subprocess per case (peak RSS above the process's baseline on CPU; the CUDA allocator's
peak on a GPU). Writes a markdown report (and a PNG of the scaling curves).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from swin_lightning.storage import save_figure, write_text


# ---------------------------------------------------------------- timing harness
def interleaved(
    cases: dict[str, Callable[[], object]], rounds: int, warmup: int = 2, self_timed: bool = False
) -> dict[str, float]:
    """Median seconds per call of each case, run in alternating order after warm-up.

    ``self_timed``: each case returns its own figure (e.g. seconds per step of a run it
    times inside), which is used instead of the call's duration.
    """
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            _sync()
            start = time.perf_counter()
            result = cases[name]()
            _sync()
            times[name].append(result if self_timed else time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------- 1. models
def build_model(impl: str, shape: str) -> nn.Module:
    """Project / timm / torchvision Swin of the same shape, stochastic depth off.

    Shapes: 'swin_t' (V1 Swin-T, 224), 'cifar' (V1 Swin-T widths, 2x2 patches, window 4) and
    'swinv2_t' (Swin V2-T, 256, window 8: timm's swinv2_tiny_window8_256, torchvision's
    swin_v2_t).
    """
    import timm

    from swin_lightning.models import create_model

    cifar = shape == "cifar"
    kwargs = {"num_classes": 10 if cifar else 1000}
    if impl == "swin_lightning":
        name = {"cifar": "swin_cifar", "swin_t": "swin_t", "swinv2_t": "swinv2_t"}[shape]
        return create_model(name, drop_path_rate=0.0, **kwargs)
    if impl == "timm":
        if shape == "swinv2_t":
            return timm.create_model("swinv2_tiny_window8_256", drop_path_rate=0.0, **kwargs)
        extra = {"img_size": 32, "patch_size": 2, "window_size": 4} if cifar else {}
        return timm.create_model(
            "swin_tiny_patch4_window7_224", pretrained=False, drop_path_rate=0.0, **extra, **kwargs
        )
    if impl == "torchvision":
        from torchvision.models import swin_transformer as tv

        if shape == "swinv2_t":
            return tv.SwinTransformer(
                patch_size=[4, 4],
                embed_dim=96,
                depths=[2, 2, 6, 2],
                num_heads=[3, 6, 12, 24],
                window_size=[8, 8],
                stochastic_depth_prob=0.0,
                block=tv.SwinTransformerBlockV2,
                downsample_layer=tv.PatchMergingV2,
                **kwargs,
            )  # fmt: skip  (swin_v2_t with stochastic depth off)
        return tv.SwinTransformer(
            patch_size=[2, 2] if cifar else [4, 4],
            embed_dim=96,
            depths=[2, 2, 6, 2],
            num_heads=[3, 6, 12, 24],
            window_size=[4, 4] if cifar else [7, 7],
            stochastic_depth_prob=0.0,
            **kwargs,
        )
    raise ValueError(f"unknown implementation {impl!r}")


SHAPES = {
    "swin_t_224": ("swin_t", 224),
    "cifar_32": ("cifar", 32),
    "swinv2_t_256": ("swinv2_t", 256),
}
IMPLS = ("swin_lightning", "timm", "torchvision")


def _step_fns(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None):
    loss_fn = nn.CrossEntropyLoss()

    def forward():
        model.eval()
        with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            model(x)

    def train_step():
        model.train()
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(x), y)
        loss.backward()
        for p in model.parameters():
            p.grad = None

    return forward, train_step


@dataclass(frozen=True)
class Variant:
    """A precision / memory-layout / compilation setting of the model benchmark.

    ``compile`` compiles the project's model and timm's (``full``, inductor), so the ratio is
    compiled against compiled; torchvision is left out of those rows.
    """

    name: str
    dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False


CPU_VARIANTS = (Variant("fp32"), Variant("bf16", torch.bfloat16))
GPU_VARIANTS = (
    Variant("fp32"),
    Variant("bf16", torch.bfloat16),
    Variant("bf16+channels_last", torch.bfloat16, channels_last=True),
    Variant("bf16+compile", torch.bfloat16, compile=True),
)

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; the
# longest name contained in torch.cuda.get_device_name() wins. --peak_tflops overrides.
GPU_PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100": 989.4,  # SXM
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
}


def peak_tflops(device: str, override: float | None = None) -> float | None:
    """The dense bf16 peak of this device in TFLOP/s (None: unknown, no MFU column)."""
    if override:
        return override
    if device != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    known = [k for k in GPU_PEAK_BF16_TFLOPS if k in name]
    return GPU_PEAK_BF16_TFLOPS[max(known, key=len)] if known else None


def train_flops_per_image(shape: str, size: int) -> int:
    """Model FLOPs of one training image: forward + backward, counted as 3x the forward."""
    from swin_lightning.models import count_flops

    return 3 * count_flops(build_model("swin_lightning", shape), (3, size, size))


def _peak_cuda_mb(step: Callable[[], None]) -> float | None:
    """Peak CUDA memory of one call above what was allocated before it (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_models(
    device: str,
    rounds: int,
    batches: dict[str, int],
    variants: Sequence[Variant] | None = None,
    shapes: Sequence[str] | None = None,
    peak: float | None = None,
    compile_backend: str = "inductor",
) -> list[dict]:
    """Images/s, forward and forward+backward, per implementation, shape and variant.

    With ``peak`` (dense TFLOP/s of the device), each row has its model FLOP utilisation:
    model FLOPs per training image x training images/s / peak. On CUDA each row also has the
    peak memory of one training step.
    """
    if variants is None:
        variants = GPU_VARIANTS if device == "cuda" else CPU_VARIANTS
    rows = []
    for shape_name in shapes or SHAPES:
        shape, size = SHAPES[shape_name]
        flops = train_flops_per_image(shape, size) if peak else None
        batch = batches[shape_name]
        torch.manual_seed(0)
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        for variant in variants:
            fmt = torch.channels_last if variant.channels_last else torch.contiguous_format
            models = {
                impl: build_model(impl, shape).to(device, memory_format=fmt) for impl in IMPLS
            }
            inputs = {impl: x.contiguous(memory_format=fmt) for impl in IMPLS}
            if variant.compile:
                del models["torchvision"]
                for model in models.values():
                    model.compile(backend=compile_backend)
            fns = {impl: _step_fns(m, inputs[impl], y, variant.dtype) for impl, m in models.items()}
            memory = {impl: _peak_cuda_mb(f[1]) for impl, f in fns.items()}
            fwd = interleaved({k: f[0] for k, f in fns.items()}, rounds)
            train = interleaved({k: f[1] for k, f in fns.items()}, rounds)
            for impl in models:
                label = f"{impl} (compiled)" if variant.compile else impl
                train_img_s = batch / train[impl]
                rows.append(
                    {
                        "shape": shape_name,
                        "batch": batch,
                        "variant": variant.name,
                        "impl": label,
                        "fwd_img_s": batch / fwd[impl],
                        "train_img_s": train_img_s,
                        "train_vs_timm": train["timm"] / train[impl],
                        "fwd_vs_timm": fwd["timm"] / fwd[impl],
                        "peak_mb": memory[impl],
                        "mfu": flops * train_img_s / (peak * 1e12) if peak else None,
                    }
                )
            del models, fns
    return rows


# ---------------------------------------------------------------- 6. compile
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

    Warm-up is the first step's wall time with inductor's and AOT autograd's caches off
    (a cold start); throughput is measured interleaved afterwards, with the eager models.
    ``backend='eager'`` (``--quick``) only exercises the path: dynamo without code generation.
    """
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from swin_lightning.models import compile_network

    shape, size = SHAPES[shape_name]
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    saved = inductor_config.fx_graph_cache, functorch_config.enable_autograd_cache
    inductor_config.fx_graph_cache = functorch_config.enable_autograd_cache = False
    torch._dynamo.reset()
    try:
        steps, warmup = {}, {}
        for label, (impl, how) in COMPILED.items():
            model = build_model(impl, shape).to(device)
            if impl == "swin_lightning":
                compile_network(model, how, backend=backend)
            else:
                model.compile(backend=backend)
            step = _step_fns(model, x, y, dtype)[1]
            _sync()
            start = time.perf_counter()
            step()
            _sync()
            warmup[label] = time.perf_counter() - start
            steps[label] = step
        for impl in ("swin_lightning", "timm"):
            steps[f"{impl}, eager"] = _step_fns(build_model(impl, shape).to(device), x, y, dtype)[1]
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


def peak_rss_bytes() -> int:
    """This process's peak resident memory.

    Linux's ``VmHWM`` belongs to the process image, so it starts afresh in a new program;
    ``ru_maxrss`` (the fallback) can carry over the forking parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_mb(impl: str, shape_name: str, batch: int, device: str, train: bool) -> float:
    """Peak memory of one forward (+backward) in a fresh process, above its baseline."""
    code = f"""
import json, torch
from swin_lightning.bench import SHAPES, build_model, peak_rss_bytes
shape, size = SHAPES[{shape_name!r}]
m = build_model({impl!r}, shape).to({device!r})
x = torch.randn({batch}, 3, size, size, device={device!r})
if {device!r} == "cuda":
    torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
else:
    base = peak_rss_bytes()
if {train}:
    m.train(); m(x).float().logsumexp(-1).sum().backward()
else:
    m.eval()
    with torch.no_grad(): m(x)
if {device!r} == "cuda":
    peak = torch.cuda.max_memory_allocated()
else:
    peak = peak_rss_bytes()
print(json.dumps((peak - base) / 2**20))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- 2. framework overhead
def bench_overhead(rounds: int, steps: int, batch: int = 64) -> dict[str, float]:
    """Seconds per training step at the demo shape: plain loop vs Trainer.fit."""
    import lightning as L
    from torch.utils.data import DataLoader

    from swin_lightning.data.embedded import draw_shapes
    from swin_lightning.models import SwinTransformer

    def net():
        torch.manual_seed(0)
        return SwinTransformer(
            img_size=32,
            patch_size=2,
            num_classes=10,
            embed_dim=48,
            depths=(2, 2),
            num_heads=(3, 6),
            window_size=4,
            drop_path_rate=0.0,
        )

    images, labels = draw_shapes(batch * steps, 10, 32, 0, 0.1)
    dataset = torch.utils.data.TensorDataset(images, labels)

    def loader():
        return DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=0)

    class Plain(L.LightningModule):
        """The plain loop's work, as a LightningModule: forward, loss, AdamW."""

        def __init__(self):
            super().__init__()
            self.net = net()

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class EpochTimer(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.start

    def fit(module_fn, **trainer_kwargs) -> float:
        timer = EpochTimer()
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            enable_model_summary=False,
            logger=False,
            enable_progress_bar=False,
            callbacks=[timer],
            **trainer_kwargs,
        )
        trainer.fit(module_fn(), train_dataloaders=loader())
        return timer.seconds / steps

    def plain_loop() -> float:
        model = net()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        start = time.perf_counter()
        for x, y in loader():
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (time.perf_counter() - start) / steps

    def full_module():
        from swin_lightning.module import SwinClassifier

        return SwinClassifier(net(), label_smoothing=0.0)

    cases = {
        "plain PyTorch loop": plain_loop,
        "Trainer.fit, same work": lambda: fit(Plain),
        "Trainer.fit, SwinClassifier (metrics, logging)": lambda: fit(full_module),
    }
    return interleaved(cases, rounds, warmup=1, self_timed=True)


# ---------------------------------------------------------------- 3. scaling with image size
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


# ---------------------------------------------------------------- 4. input pipeline
def bench_input_pipeline(num_images: int, workers: list[int]) -> list[dict]:
    """Images/s of the ImageFolder training loader (timm augmentation at 224)."""
    import numpy as np
    from PIL import Image

    from swin_lightning.data import ImageFolderDataModule

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for split in ("train", "val"):
            for cls in ("a", "b"):
                folder = Path(tmp) / split / cls
                folder.mkdir(parents=True)
                for i in range(num_images // 2 if split == "train" else 1):
                    pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)  # ImageNet-like
                    Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
        for n in workers:
            dm = ImageFolderDataModule(tmp, image_size=224, batch_size=16, num_workers=n)
            dm.setup("fit")
            loader = dm.train_dataloader()
            for _ in loader:  # warm-up pass (worker start, file cache)
                pass
            start = time.perf_counter()
            seen = sum(len(b[0]) for b in loader)
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "workers": n,
                    "img_s": seen / seconds,
                    "img_s_per_worker": seen / seconds / max(n, 1),
                }
            )
    return rows


# ---------------------------------------------------------------- 5. attention kernels
ATTENTION_SHAPES = {
    # (batch x windows, heads, tokens per window, head dim) of a masked (SW-MSA) block
    "swin_t_224 stage 1 (batch 4)": (4, 64, 3, 49, 32),
    "cifar_32 stage 1 (batch 32)": (32, 16, 3, 16, 32),
}


def bench_attention(rounds: int, device: str = "cpu") -> list[dict]:
    """Milliseconds per attention call: fused SDPA vs matmul-softmax-matmul, and the choice.

    The additive tensor (relative position bias + shift mask) needs a gradient in training,
    which the CPU's fused SDPA kernel cannot give; :func:`~swin_lightning.models.swin.attend`
    then falls back to the explicit kernel. This measures what that choice is worth.
    """
    import torch.nn.functional as F

    from swin_lightning.models.swin import attend, attend_explicit

    kernels = {
        "SDPA": lambda q, k, v, a: F.scaled_dot_product_attention(q, k, v, attn_mask=a),
        "matmul-softmax": attend_explicit,
        "attend (the model's choice)": attend,
    }
    rows = []
    for shape_name, (B, nW, h, N, d) in ATTENTION_SHAPES.items():
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, nW * h, N, d, device=device) for _ in range(3))
        additive = torch.randn(1, nW * h, N, N, device=device)
        for mode in ("forward", "fwd+bwd"):
            train = mode == "fwd+bwd"
            inputs = [t.clone().requires_grad_(train) for t in (q, k, v, additive)]

            def call(kernel, inputs=inputs, train=train):
                def step():
                    with torch.set_grad_enabled(train):
                        out = kernel(*inputs)
                    if train:
                        out.sum().backward()
                        for t in inputs:
                            t.grad = None

                return step

            times = interleaved({name: call(fn) for name, fn in kernels.items()}, rounds)
            for name, sec in times.items():
                rows.append({"shape": shape_name, "mode": mode, "kernel": name, "ms": 1000 * sec})
    return rows


# ---------------------------------------------------------------- report
def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import lightning
    import timm
    import torchvision

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"- CPU: {cpu}, {torch.get_num_threads()} torch threads; GPU: {gpu}; "
        f"RAM: {ram:.0f} GiB\n"
        f"- Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
        f"torchvision {torchvision.__version__}, lightning {lightning.__version__}\n"
    )


MODEL_COLUMNS = ("shape", "batch", "precision", "implementation", "forward", "fwd+bwd",
                 "fwd vs timm", "fwd+bwd vs timm", "peak MB fwd+bwd")  # fmt: skip


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def run(args: argparse.Namespace) -> str:
    quick = args.quick
    device = args.device
    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    md = ["# Benchmarks", "", f"Command: `{args.command}`", "", machine()]
    md += [
        "Every comparison runs in one process, interleaved, after warm-up; figures are medians.",
        "",
    ]

    batches = {
        "swin_t_224": 2 if quick else 4,
        "cifar_32": 16 if quick else 32,
        "swinv2_t_256": 2 if quick else 4,
    }
    peak = peak_tflops(device, args.peak_tflops)
    rows = bench_models(device, rounds=3 if quick else 7, batches=batches, peak=peak)
    mfu_head = ["MFU"] if peak else []
    md += [
        "## 1. Model throughput (images/s; ratio = project / timm)",
        "",
        *(
            [f"MFU: model FLOPs per training image (3x forward) x images/s / {peak:g} TFLOP/s."]
            if peak
            else []
        ),
        "",
        _md_row([*MODEL_COLUMNS, *mfu_head]),
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
        md.append(_md_row(cells))
    md.append("")

    steps = 10 if quick else 30
    overhead = bench_overhead(rounds=2 if quick else 5, steps=steps)
    plain = overhead["plain PyTorch loop"]
    md += [
        "## 2. Framework overhead (demo shape: 32x32, batch 64, 301 K-parameter Swin, AdamW)",
        "",
        "| loop | ms per step | vs plain loop |",
        "|---|---|---|",
    ]
    for name, sec in overhead.items():
        md.append(f"| {name} | {1000 * sec:.1f} | {100 * (sec / plain - 1):+.1f}% |")
    md.append("")

    sizes = [56, 112] if quick else [56, 112, 224]
    scaling = bench_scaling(sizes, rounds=3 if quick else 5)
    plot_scaling(scaling, out_dir / "bench_scaling.png")
    md += [
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
    md += ["", "![scaling](bench_scaling.png)", ""]

    pipeline = bench_input_pipeline(32 if quick else 96, [0, 2] if not quick else [0])
    md += [
        "## 4. Input pipeline (ImageFolder train loader, timm RandAugment m9 + random erasing, 224, JPEG 500x375)",
        "",
        "| workers | images/s | images/s per worker |",
        "|---|---|---|",
    ]
    for r in pipeline:
        label = "0 (main process)" if r["workers"] == 0 else str(r["workers"])
        md.append(f"| {label} | {r['img_s']:.1f} | {r['img_s_per_worker']:.1f} |")
    md.append("")

    attention = bench_attention(rounds=3 if quick else 9, device=device)
    md += [
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
    backend = "eager" if quick else "inductor"
    compiled = bench_compile(
        device, "cifar_32", 8 if quick else 32, rounds=3 if quick else 7, backend=backend
    )
    md += [
        "",
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
    md += ["", f"Total benchmark time: {time.perf_counter() - started:.0f} s.", ""]
    text = "\n".join(md)
    write_text(args.out, text)
    write_text(
        out_dir / "bench_results.json",
        json.dumps(
            {
                "models": rows,
                "overhead_s_per_step": overhead,
                "scaling": scaling,
                "pipeline": pipeline,
                "attention": attention,
                "compile": compiled,
            },
            indent=1,
        ),
    )
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
    args = parser.parse_args(argv)
    args.command = "python -m swin_lightning bench " + " ".join(
        argv if argv is not None else sys.argv[2:]
    )
    print(run(args))
    return 0
