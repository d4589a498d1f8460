"""The network on CUDA: the CPU's fp32 logits and gradients, bf16 within tolerance, fused
attention kernels (not the math fallback) with the shift mask and position bias, channels-last
input, and ``torch.compile`` (full and regional) clean and equal to eager."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel

from swin_lightning.models import SwinTransformer, compile_network

# Two stages, both with shifted windows and masks (16x16 and 8x8 tokens at 64 px, window 4).
SMALL = {"patch_size": 4, "embed_dim": 32, "depths": (2, 2), "num_heads": (2, 4),
         "window_size": 4, "num_classes": 10, "drop_path_rate": 0.0}  # fmt: skip
V2 = {"block_norm": "post", "attention": "cosine", "pos_embed": "cpb", "merge_norm": "post"}
CASES = {
    "v1-square": {**SMALL, "img_size": 64},
    "v1-nonsquare": {**SMALL, "img_size": (64, 96)},
    "v2-square": {**SMALL, **V2, "img_size": 64},
    "v2-nonsquare": {**SMALL, **V2, "img_size": (64, 96)},
    # The paper's window: 49 tokens, a size the fused kernels must pad (28x28 and 14x14 tokens).
    "v1-window7": {**SMALL, "img_size": 112, "window_size": 7},
}
# Fused SDPA kernels that take an arbitrary additive mask (flash attention takes none).
FUSED = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 off, so CUDA's fp32 is comparable with the CPU's."""
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn


def pair(case: str) -> tuple[SwinTransformer, SwinTransformer, torch.Tensor]:
    """The same random network on the CPU and on CUDA, and a CPU batch of 3 images."""
    torch.manual_seed(0)
    cpu = SwinTransformer(**CASES[case])
    for p in cpu.parameters():  # give the zero-initialised biases and tables some weight
        p.data.add_(0.02 * torch.randn_like(p))
    size = cpu.img_size
    return cpu, copy.deepcopy(cpu).cuda(), torch.randn(3, 3, *size)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_the_cpu_and_bf16_is_close(case):
    cpu, gpu, x = pair(case)
    cpu.eval(), gpu.eval()
    with torch.no_grad():
        want = cpu(x)
        got = gpu(x.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = gpu(x.cuda())
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=0)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert relative_error(low, want) < 2e-2


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_equal_the_cpu(case):
    cpu, gpu, x = pair(case)
    y = torch.arange(3) % 10
    for net, inputs, targets in ((cpu, x, y), (gpu, x.cuda(), y.cuda())):
        net.train()
        F.cross_entropy(net(inputs), targets).backward()
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        assert p_gpu.grad is not None, name
        assert relative_error(p_gpu.grad, p_cpu.grad) < 1e-3, name


def profiled_names(fn) -> tuple[set[str], set[str]]:
    """(aten operators, CUDA kernels) that ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    ops = {e.name for e in events if e.device_type.name == "CPU" and e.name.startswith("aten::")}
    return ops, {e.name for e in events if e.device_type.name == "CUDA"}


FUSED_OPS = {"aten::_scaled_dot_product_efficient_attention",
             "aten::_scaled_dot_product_cudnn_attention",
             "aten::_scaled_dot_product_flash_attention"}  # fmt: skip
MATH_OP = "aten::_scaled_dot_product_attention_math"
# Kernel names: cutlass mem-efficient (fmha_cutlassF/B_*), cuDNN's fused SDPA, flash.
FUSED_KERNELS = ("fmha", "sdpa", "flash_fwd", "flash_bwd")


@pytest.mark.parametrize("case", ["v1-square", "v2-nonsquare", "v1-window7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_with_mask_and_bias_runs_a_fused_kernel(case, dtype):
    _, gpu, x = pair(case)
    gpu.train()
    x, y = x.cuda(), torch.arange(3, device="cuda") % 10

    def step():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(gpu(x), y)
        loss.backward()

    # Only fused kernels allowed: SDPA raises "No available kernel" if none takes the call
    # (the mask, the bias that needs a gradient, 16 or 49 tokens of 16 channels per head).
    with sdpa_kernel(FUSED):
        step()
    grads = [p.grad for p in gpu.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # With every backend allowed (the default): a fused attention operator and its kernel
    # run, and the math fallback does not.
    ops, kernels = profiled_names(step)
    assert ops & FUSED_OPS and MATH_OP not in ops, sorted(o for o in ops if "dot_product" in o)
    assert any(k in name.lower() for name in kernels for k in FUSED_KERNELS), sorted(kernels)[:40]


def test_channels_last_input_gives_the_same_logits():
    _, gpu, x = pair("v1-nonsquare")
    gpu.eval()
    x = x.cuda()
    with torch.no_grad():
        want = gpu(x)
        got = gpu(x.contiguous(memory_format=torch.channels_last))
        gpu.to(memory_format=torch.channels_last)  # the patch embedding's conv weight too
        both = gpu(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = gpu(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(both, want, atol=1e-5, rtol=0)
    assert relative_error(low, want) < 2e-2


def test_cosine_attention_trains_in_bf16():
    # V2's cosine attention with its clamped logit scale: a bf16 step gives finite gradients
    # close to fp32's, and the logit scale gets a gradient.
    _, gpu, x = pair("v2-square")
    ref = copy.deepcopy(gpu)
    x, y = x.cuda(), torch.arange(3, device="cuda") % 10
    for net, low in ((gpu, True), (ref, False)):
        net.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=low):
            F.cross_entropy(net(x), y).backward()
    scales = [p for n, p in gpu.named_parameters() if n.endswith("logit_scale")]
    assert scales and all(p.grad is not None and p.grad.abs().sum() > 0 for p in scales)
    for name, p in gpu.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    total = torch.cat([p.grad.flatten() for p in gpu.parameters()])
    want = torch.cat([q.grad.flatten() for q in ref.parameters()])
    assert relative_error(total, want) < 0.1  # bf16 keeps 8 bits of mantissa


@pytest.mark.parametrize(("how", "case"), [("full", "v1-window7"), ("regional", "v1-square")])
def test_compile_on_cuda_is_clean_and_equals_eager(how, case, dynamo):
    # window 7 (49 tokens) is the size inductor must pad for the attention bias
    _, eager, x = pair(case)
    compiled = copy.deepcopy(eager)
    compile_network(compiled, how)  # inductor: Triton kernels on CUDA
    x, y = x.cuda(), torch.arange(3, device="cuda") % 10
    graphs, outputs, grads = [], [], []
    for train in (True, False, True, False):
        for net in (compiled, eager):
            net.train(train)
            net.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(train):
            got, want = compiled(x), eager(x)
            if train:
                F.cross_entropy(got, y).backward()
                F.cross_entropy(want, y).backward()
                grads += [(n, p.grad, q.grad) for (n, p), q in
                          zip(compiled.named_parameters(), eager.parameters(), strict=True)]  # fmt: skip
        graphs.append(counters["stats"]["unique_graphs"])
        outputs.append((got.detach(), want.detach()))
    assert not dynamo["graph_break"], dict(dynamo["graph_break"])
    assert dynamo["frames"]["ok"] == dynamo["frames"]["total"]
    # Train and val compile once each; back and forth compiles nothing more.
    assert graphs[2:] == [graphs[1], graphs[1]] and graphs[0] < graphs[1]
    for got, want in outputs:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for name, got, want in grads:
        assert relative_error(got, want) < 1e-3, name
