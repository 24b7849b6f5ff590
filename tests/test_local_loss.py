"""The local-loss form of every objective that has one (issue #14): the terms of a range of rows
against every column. Cutting the rows into ranges (one of them empty) and adding the ranges'
losses must give the whole batch's loss, in value and gradient; that is what lets each rank
compute only its rows. In one process (`Rows` with world 1), so the arithmetic is checked apart
from the gather, which tests/test_distributed.py runs with two real processes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from coalign.objectives.contrastive import info_nce, soft_info_nce
from coalign.objectives.distill import distill_kl
from coalign.objectives.distributed import Rows
from coalign.objectives.filip import filip_loss
from coalign.objectives.gram import gram_loss
from coalign.objectives.intra_modal import nt_xent
from coalign.objectives.multi_positive import multi_positive_info_nce
from coalign.objectives.symile import draw_permutations, symile_loss
from coalign.objectives.tiled import tiled_info_nce

N, E = 7, 5
PARTS = [(0, 2), (2, 2), (2, 6), (6, 7)]  # one range empty, one of a single row


def _unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1).requires_grad_()


def _cases():
    """name -> (leaves, loss(rows)) on float64 inputs."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    a, b, c = _unit(N, E), _unit(N, E), _unit(N, E)
    ta, tb = _unit(N, 3), _unit(N, 3)
    t = _unit(N, 3, E)
    mask = torch.rand(N, 3, generator=g) < 0.6
    mask[0] = False  # an image without captions
    img, txt = _unit(N, 4, E), _unit(N, 6, E)
    img_mask = torch.rand(N, 4, generator=g) < 0.8
    txt_mask = torch.rand(N, 6, generator=g) < 0.7
    img_mask[:, 0] = txt_mask[:, 0] = True
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    perms = draw_permutations(3, N, generator=g)
    return {
        "info_nce": ([a, b, s], lambda r: info_nce(a, b, s, r)),
        "soft_info_nce": ([a, b, s], lambda r: soft_info_nce(a, b, s, 0.1, 0.3, r)),
        "tiled_info_nce": ([a, b, s], lambda r: tiled_info_nce(a, b, s, 3, r)),
        "multi_positive": ([a, t, s], lambda r: multi_positive_info_nce(a, t, mask, s, r)),
        "symile_n": ([a, b, c, s], lambda r: symile_loss([a, b, c], s, "n", perms, r)),
        "symile_n_squared": ([a, b, c, s], lambda r: symile_loss([a, b, c], s, "n_squared", None, r)),
        "gram": ([a, b, c, s], lambda r: gram_loss(a, [b, c], s, 0.1, 1e-8, r)),
        "filip": ([img, txt, s], lambda r: filip_loss(img, img_mask, txt, txt_mask, s, 2, r)),
        "distill": ([a, b], lambda r: distill_kl(a, b, ta, tb, 0.5, r)),
        "nt_xent": ([a, b], lambda r: nt_xent(a, b, 0.2, r)),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_the_rows_ranges_add_up_to_the_whole_batch_loss(name):
    leaves, loss = _cases()[name]
    whole = loss(None)
    expected = torch.autograd.grad(whole, leaves)
    parts = [loss(Rows(s, e, N)) for s, e in PARTS]
    total = torch.stack(parts).sum()
    # float64 throughout, except the tiled kernel, whose math is float32 whatever its input
    tol = {"rtol": 1e-5, "atol": 1e-6} if name.startswith("tiled") else {"rtol": 1e-9, "atol": 1e-11}
    torch.testing.assert_close(total, whole.detach().to(total.dtype), **tol)
    got = torch.autograd.grad(total, leaves)
    for x, y in zip(got, expected, strict=True):
        torch.testing.assert_close(x, y, **tol)


def test_rows_scale_by_the_world_so_the_ranks_mean_is_the_loss():
    """W ranks each return W * (their share): the mean over ranks is the whole loss."""
    torch.manual_seed(1)
    a, b = _unit(N, E), _unit(N, E)
    s = torch.tensor(2.0, dtype=torch.float64)
    ranks = [(0, 3), (3, 5), (5, 7)]
    per_rank = [info_nce(a, b, s, Rows(lo, hi, N, world=3)) for lo, hi in ranks]
    torch.testing.assert_close(torch.stack(per_rank).mean(), info_nce(a, b, s).detach(), rtol=1e-10, atol=0)
    # a rank that holds every row (the others none) returns W times the loss
    torch.testing.assert_close(info_nce(a, b, s, Rows(0, N, N, world=3)), 3 * info_nce(a, b, s))
