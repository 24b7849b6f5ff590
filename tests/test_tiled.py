"""The tiled InfoNCE equals the plain one in value and gradient, whatever the tile (issue #14.4)."""

import pytest
import torch
import torch.nn.functional as F

from coalign.objectives.contrastive import info_nce
from coalign.objectives.tiled import tiled_info_nce


@pytest.mark.parametrize("n, tile", [(7, 3), (8, 8), (9, 100), (16, 1)])
def test_tiled_info_nce_matches_the_plain_loss_in_value_and_gradient(n, tile):
    torch.manual_seed(n)
    a = F.normalize(torch.randn(n, 5, dtype=torch.float64), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(n, 5, dtype=torch.float64), dim=-1).requires_grad_()
    scale = torch.tensor(14.0, dtype=torch.float64, requires_grad=True)
    # float32 inside the tiled loss: compare at float32 precision
    fast = lambda: tiled_info_nce(a, b, scale, tile).double()  # noqa: E731
    slow = lambda: info_nce(a.float(), b.float(), scale.float()).double()  # noqa: E731
    f, s = fast(), slow()
    torch.testing.assert_close(f, s, atol=1e-5, rtol=1e-5)
    ga = torch.autograd.grad(fast(), (a, b, scale))
    gs = torch.autograd.grad(slow(), (a, b, scale))
    for x, y in zip(ga, gs, strict=True):
        torch.testing.assert_close(x, y.to(x.dtype), atol=1e-5, rtol=1e-4)


def test_large_logit_scales_stay_finite():
    a = F.normalize(torch.randn(64, 8), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(64, 8), dim=-1).requires_grad_()
    scale = torch.tensor(1000.0, requires_grad=True)
    loss = tiled_info_nce(a, b, scale, 16)
    loss.backward()
    torch.testing.assert_close(loss, info_nce(a, b, scale), rtol=1e-4, atol=1e-3)
    assert all(torch.isfinite(t.grad).all() for t in (a, b, scale))


def test_clip_objective_with_tiles_equals_without(tmp_path):
    from coalign.objectives.contrastive import InfoNCE

    torch.manual_seed(0)
    a = F.normalize(torch.randn(10, 6), dim=-1)
    b = F.normalize(torch.randn(10, 6), dim=-1)

    class F_:
        def __init__(self, e):
            self.embedding = e

    features = {"image": F_(a), "text": F_(b)}
    plain, tiled = InfoNCE(), InfoNCE(tile=4)
    torch.testing.assert_close(plain(features, {})["clip_loss"], tiled(features, {})["clip_loss"])
