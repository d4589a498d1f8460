"""Table 1: model throughput of the project, timm and torchvision (precisions, layouts,
compiled rows on a GPU), with peak memory and MFU."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from swin_lightning.bench.harness import interleaved


def build_model(impl: str, shape: str) -> nn.Module:
    """Project / timm / torchvision Swin of the same shape, stochastic depth off.

    Shapes: 'swin_t' (V1 Swin-T, 224), 'cifar' (V1 Swin-T widths, 2x2 patches, window 4) and
    'swinv2_t' (Swin V2-T, 256, window 8: timm's swinv2_tiny_window8_256, torchvision's
    swin_v2_t). ``MLP_IMPL`` is the project's network of a V1 shape with the MLP mixer
    (``mixer: mlp``), which no other library has.
    """
    import timm

    from swin_lightning.models import create_model

    cifar = shape == "cifar"
    kwargs = {"num_classes": 10 if cifar else 1000}
    if impl in ("swin_lightning", MLP_IMPL):
        name = {"cifar": "swin_cifar", "swin_t": "swin_t", "swinv2_t": "swinv2_t"}[shape]
        if impl == MLP_IMPL:  # the same network with Swin-MLP's token mixer (V1 shapes)
            kwargs.update(mixer="mlp", pos_embed="none")
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
MLP_IMPL = "swin_lightning (mlp mixer)"


def impls_of(shape: str) -> tuple[str, ...]:
    """The implementations timed at a shape: the MLP mixer row at the V1 shapes."""
    return (*IMPLS, MLP_IMPL) if shape in ("swin_t", "cifar") else IMPLS


def step_fns(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None):
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


def train_flops_per_image(shape: str, size: int, impl: str = "swin_lightning") -> int:
    """Model FLOPs of one training image: forward + backward, counted as 3x the forward (the
    MLP mixer's own; the other implementations compute the project's network)."""
    from swin_lightning.models import count_flops

    network = MLP_IMPL if impl.startswith(MLP_IMPL) else "swin_lightning"
    return 3 * count_flops(build_model(network, shape), (3, size, size))


def peak_cuda_mb(step: Callable[[], None]) -> float | None:
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
    warmup: int = 2,
) -> list[dict]:
    """Images/s, forward and forward+backward, per implementation, shape and variant, as
    medians of ``rounds`` timed calls after ``warmup`` untimed ones.

    With ``peak`` (dense TFLOP/s of the device), each row has its model FLOP utilisation:
    model FLOPs per training image x training images/s / peak. On CUDA each row also has the
    peak memory of one training step.
    """
    if variants is None:
        variants = GPU_VARIANTS if device == "cuda" else CPU_VARIANTS
    rows = []
    for shape_name in shapes or SHAPES:
        shape, size = SHAPES[shape_name]
        flops = {i: train_flops_per_image(shape, size, i) for i in impls_of(shape)} if peak else {}
        batch = batches[shape_name]
        torch.manual_seed(0)
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        for variant in variants:
            fmt = torch.channels_last if variant.channels_last else torch.contiguous_format
            impls = impls_of(shape)
            models = {
                impl: build_model(impl, shape).to(device, memory_format=fmt) for impl in impls
            }
            inputs = {impl: x.contiguous(memory_format=fmt) for impl in impls}
            if variant.compile:
                del models["torchvision"]
                for model in models.values():
                    model.compile(backend=compile_backend)
            fns = {impl: step_fns(m, inputs[impl], y, variant.dtype) for impl, m in models.items()}
            memory = {impl: peak_cuda_mb(f[1]) for impl, f in fns.items()}
            fwd = interleaved({k: f[0] for k, f in fns.items()}, rounds, warmup)
            train = interleaved({k: f[1] for k, f in fns.items()}, rounds, warmup)
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
                        "mfu": flops[impl] * train_img_s / (peak * 1e12) if peak else None,
                    }
                )
            del models, fns
    return rows


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
