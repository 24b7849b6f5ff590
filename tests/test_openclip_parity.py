"""coalign's contrastive losses against OpenCLIP's reference implementations, in value and gradient.

OpenCLIP's losses take the already-exponentiated logit scale (and SigLIP's bias), as coalign's pure
loss functions do, so both sides are called on the very same tensors.
"""

import pytest
import torch
import torch.nn.functional as F

from coalign.objectives.contrastive import info_nce
from coalign.objectives.siglip import chunked_siglip_loss, siglip_loss

open_clip_loss = pytest.importorskip("open_clip.loss")


def _inputs(B, E, dtype, scale, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(B, E, generator=g, dtype=dtype), dim=-1)
    text = F.normalize(image + 0.8 * torch.randn(B, E, generator=g, dtype=dtype), dim=-1)
    leaves = [image, text, torch.tensor(scale, dtype=dtype), torch.tensor(bias, dtype=dtype)]
    return [t.requires_grad_() for t in leaves]


def _value_and_grads(loss, wrt):
    return (loss, *torch.autograd.grad(loss, wrt))


def _assert_all_close(got, want, **tol):
    for name, g, w in zip(("value", "d/image", "d/text", "d/scale", "d/bias"), got, want, strict=False):
        torch.testing.assert_close(g, w, **tol, msg=lambda m, name=name: f"{name}: {m}")


# float64 pins the formulas; float32 at a realistic batch size checks nothing is lost in precision.
# Each chunk leaves a short last block (13 = 5 + 5 + 3, 256 = 100 + 100 + 56).
CASES = [(torch.float64, 13, 8, 5, {}), (torch.float32, 256, 64, 100, {"rtol": 1e-5, "atol": 1e-6})]


@pytest.mark.parametrize("dtype,B,E,chunk,tol", CASES)
def test_info_nce_matches_openclip_clip_loss(dtype, B, E, chunk, tol):
    image, text, scale, _ = _inputs(B, E, dtype, scale=1 / 0.07, bias=0.0)
    ours = _value_and_grads(info_nce(image, text, scale), (image, text, scale))
    theirs = _value_and_grads(open_clip_loss.ClipLoss()(image, text, scale), (image, text, scale))
    _assert_all_close(ours, theirs, **tol)


@pytest.mark.parametrize("dtype,B,E,chunk,tol", CASES)
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (4.0, 1.5)])
@pytest.mark.parametrize("chunked", [False, True])
def test_siglip_matches_openclip_siglip_loss(dtype, B, E, chunk, tol, scale, bias, chunked):
    leaves = _inputs(B, E, dtype, scale=scale, bias=bias)
    theirs = _value_and_grads(open_clip_loss.SigLipLoss()(*leaves), leaves)
    ours_loss = chunked_siglip_loss(*leaves, chunk=chunk) if chunked else siglip_loss(*leaves)
    _assert_all_close(_value_and_grads(ours_loss, leaves), theirs, **tol)
