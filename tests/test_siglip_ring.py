"""SigLIP across ranks by passing texts around a ring (issue #14), with real gloo processes: the
ranks' mean loss is the single-process SigLIP loss of the global batch, and each rank's gradients
are W times the global batch's gradient of its own rows (the trainer's average over ranks then
gives the single-process parameter gradient). Three ranks: with two, the next and the previous
rank are the same one, and a ring turned the wrong way would pass; uneven row counts, one rank
with none; plain and chunked blocks. The objective itself runs with two processes in the test of
every objective (tests/test_distributed.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from coalign.objectives.siglip import ring_siglip_loss, siglip_loss

pytestmark = pytest.mark.slow

COUNTS = {3: [4, 0, 3]}


def _inputs(world: int):
    g = torch.Generator().manual_seed(world)
    n = sum(COUNTS[world])
    a = F.normalize(torch.randn(n, 6, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(n, 6, generator=g, dtype=torch.float64), dim=-1)
    return a, b, torch.tensor(4.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)


def _worker(rank: int, world: int, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{root}/rv", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        a, b, s, t = (x.requires_grad_() for x in _inputs(world))
        expected = siglip_loss(a, b, s, t)
        ga, gb, gs, gt = torch.autograd.grad(expected, (a, b, s, t))
        lo = sum(COUNTS[world][:rank])
        hi = lo + COUNTS[world][rank]
        for chunk in (None, 2):
            mine = [x.detach()[lo:hi].clone().requires_grad_() for x in (a, b)]
            scale, bias = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
            loss = ring_siglip_loss(*mine, scale, bias, chunk)
            loss.backward()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            torch.testing.assert_close(mean / world, expected.detach(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(mine[0].grad, world * ga[lo:hi], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(mine[1].grad, world * gb[lo:hi], rtol=1e-10, atol=1e-12)
            for got, want in ((scale.grad, gs), (bias.grad, gt)):
                got = got.clone()
                dist.all_reduce(got)
                torch.testing.assert_close(got / world, want, rtol=1e-10, atol=1e-12)
        dist.barrier()  # no rank tears the group down while a neighbour's last pass is in flight
    finally:
        dist.destroy_process_group()


def test_the_ring_gives_the_global_batch_loss_and_gradients(tmp_path):
    mp.spawn(_worker, args=(3, str(tmp_path)), nprocs=3, join=True)
