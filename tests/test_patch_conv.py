"""PatchConv: the patch embedding as one matmul gives nn.Conv2d's result and gradients."""

import pytest
import torch
from torch import nn

from coalign.models.layers import PatchConv


@pytest.mark.parametrize(
    ("channels", "patch", "size", "bias"),
    [(3, 8, (64, 64), True), (3, 4, (30, 21), False), (1, (16, 4), (64, 50), True)],
)
def test_patch_conv_is_the_convolution(channels, patch, size, bias):
    torch.manual_seed(0)
    ours = PatchConv(channels, 24, patch, bias=bias).double()
    conv = nn.Conv2d(channels, 24, patch, patch, bias=bias).double()
    conv.load_state_dict(ours.state_dict())  # same keys and shapes: checkpoints load either way
    x = torch.randn(5, channels, *size, dtype=torch.float64, requires_grad=True)
    y, ref = ours(x), conv(x)
    assert y.shape == ref.shape  # rows and columns that fill no patch are dropped, as by the conv
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(ref)
    grads = torch.autograd.grad((y * weights).sum(), [x, *ours.parameters()])
    ref_grads = torch.autograd.grad((ref * weights).sum(), [x, *conv.parameters()])
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    # the ViT's (B, P, D) tokens come from a view of the result, row-major over the patch grid
    tokens = y.flatten(2).transpose(1, 2)
    assert tokens.is_contiguous()
    torch.testing.assert_close(tokens, ref.flatten(2).transpose(1, 2), rtol=1e-12, atol=1e-12)
