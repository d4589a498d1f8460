"""Table 5: the attention kernels ``attend`` chooses between."""

from __future__ import annotations

import torch

from swin_lightning.bench.harness import interleaved

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
