"""The attention kernels the model chooses between compute the same values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from swin_lightning.models.swin import attend, attend_explicit


def _inputs(mask: bool):
    torch.manual_seed(0)
    B, nW, h, N, d = 2, 4, 3, 16, 8
    q, k, v = (torch.randn(B, nW * h, N, d, requires_grad=True) for _ in range(3))
    additive = torch.randn(1, nW * h, N, N, requires_grad=True)
    if mask:  # the shift mask's value between source regions
        with torch.no_grad():
            additive[..., :8, 8:] = -100.0
    return q, k, v, additive


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("kernel", [attend, attend_explicit])
def test_kernels_match_sdpa_values_and_gradients(kernel, mask):
    reference_inputs = _inputs(mask)
    reference = F.scaled_dot_product_attention(*reference_inputs[:3], attn_mask=reference_inputs[3])
    reference.square().sum().backward()
    inputs = _inputs(mask)
    out = kernel(*inputs)
    out.square().sum().backward()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    for got, want in zip(inputs, reference_inputs, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)


def test_explicit_kernel_without_bias_is_plain_attention():
    q, k, v, _ = _inputs(False)
    torch.testing.assert_close(
        attend_explicit(q, k, v, None), F.scaled_dot_product_attention(q, k, v)
    )


def test_explicit_kernel_under_bf16_autocast_matches_fp32():
    # The model hands the bias + mask over in fp32: added to bf16 logits, the softmax and the
    # bias's gradient run in fp32 (as timm's do), so both stay within bf16 rounding of fp32.
    q, k, v, additive = _inputs(True)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=additive)
    reference.square().sum().backward()
    want_grad = additive.grad.clone()
    additive.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qb, kb, vb = (t.detach().to(torch.bfloat16) for t in (q, k, v))
        out = attend_explicit(qb, kb, vb, additive)
    out.float().square().sum().backward()
    assert additive.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), reference, rtol=0.03, atol=0.03)
    torch.testing.assert_close(additive.grad, want_grad, rtol=0.05, atol=0.05)
