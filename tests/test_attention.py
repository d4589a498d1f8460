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
