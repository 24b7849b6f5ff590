"""The explicit bf16 CPU attention against PyTorch's SDPA in fp32 (values and gradients)."""

import pytest
import torch
import torch.nn.functional as F

from coalign.models.layers import attention, padding_attn_mask


def _inputs(seed: int, n: int = 7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 2, n, 16, generator=g, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("masked", ["none", "padding", "causal", "empty_row"])
def test_bf16_attention_matches_sdpa(masked):
    """Training takes the explicit form (inputs that require grad), checked against fp32 SDPA."""
    q, k, v = _inputs(0)
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[1, 4:] = False
    if masked == "empty_row":
        valid[2] = False  # a sample with no token at all: SDPA gives zeros, not NaN
    mask = None if masked == "none" else padding_attn_mask(valid, causal=masked == "causal")
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    (want * torch.linspace(-1, 1, 16)).sum().backward()
    want_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    got = attention(*(t.bfloat16() for t in (q, k, v)), mask)
    assert got.dtype == torch.bfloat16
    (got.float() * torch.linspace(-1, 1, 16)).sum().backward()
    assert torch.isfinite(got.float()).all()
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
    for t, g in zip((q, k, v), want_grads, strict=True):
        torch.testing.assert_close(t.grad, g, atol=5e-2, rtol=5e-2)


def test_fp32_takes_sdpa_exactly():
    q, k, v = _inputs(1)
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=0, rtol=0)
