"""Symmetric InfoNCE that never holds the (B, B) logits: tiles, an online log-sum-exp, and a
backward that recomputes each tile.

Forward: for every (t, t) tile of logits s * a_I . b_J, fold its row and column log-sum-exps into
running (B,) vectors (numerically as `torch.logsumexp`), and take the positives s * a_i . b_i from
the diagonal tiles. The loss is 1/2B sum_i [2 pos_i - row_lse_i - col_lse_i] negated.

Backward: dL/dlogit_ij = (softmax_row_ij + softmax_col_ij - 2 delta_ij) / 2B, where each softmax is
exp(logit_ij - lse) from the saved vectors; a tile of it is rebuilt from a_I, b_J and the lses, and
gives a_I its share G_IJ b_J s, b_J its share G_IJ^T a_I s, and s its share sum(G_IJ * logit_IJ) / s.
Memory: O(B d + t^2) in both passes instead of O(B^2); time: about three matmuls of the full
matrix (one forward, two backward), the price of not storing it. Math in float32 whatever the input.

Value and gradient equal `contrastive.info_nce` (tested); `clip` uses it with `tile: N`.

The local loss (several ranks, objectives/distributed.py) needs a rank's m rows against all B
columns in each direction: `_TiledRowCE` is the one-direction kernel on an (m, B) strip, the same
online log-sum-exp and recomputing backward, run once per direction.
"""

from __future__ import annotations

import torch

from coalign.objectives.distributed import Rows


def _tiles(n: int, t: int) -> list[tuple[int, int]]:
    return [(i, min(i + t, n)) for i in range(0, n, t)]


class _TiledInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, tile: int) -> torch.Tensor:
        a32, b32, s = a.float(), b.float(), scale.float()
        n = a.shape[0]
        row = torch.full((n,), float("-inf"), device=a.device)
        col = torch.full((n,), float("-inf"), device=a.device)
        pos = (a32 * b32).sum(-1) * s  # (B,) the diagonal, without forming it from tiles
        for i0, i1 in _tiles(n, tile):
            for j0, j1 in _tiles(n, tile):
                logits = s * a32[i0:i1] @ b32[j0:j1].T  # (t, t)
                row[i0:i1] = torch.logaddexp(row[i0:i1], torch.logsumexp(logits, dim=1))
                col[j0:j1] = torch.logaddexp(col[j0:j1], torch.logsumexp(logits, dim=0))
        ctx.save_for_backward(a, b, scale, row, col)
        ctx.tile = tile
        return (row + col - 2 * pos).sum() / (2 * n)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        a, b, scale, row, col = ctx.saved_tensors
        a32, b32, s = a.float(), b.float(), scale.float()
        n, t = a.shape[0], ctx.tile
        ga, gb = torch.zeros_like(a32), torch.zeros_like(b32)
        gs = torch.zeros((), device=a.device)
        for i0, i1 in _tiles(n, t):
            for j0, j1 in _tiles(n, t):
                dots = a32[i0:i1] @ b32[j0:j1].T  # (t, t) cosines
                logits = s * dots
                g = torch.exp(logits - row[i0:i1, None]) + torch.exp(logits - col[None, j0:j1])
                if i0 == j0:  # a diagonal tile: the positives' -2 delta_ij
                    g.diagonal().sub_(2.0)
                g /= 2 * n
                ga[i0:i1] += s * g @ b32[j0:j1]
                gb[j0:j1] += s * g.T @ a32[i0:i1]
                gs += (g * dots).sum()
        scale_grad = grad_out * gs if ctx.needs_input_grad[2] else None
        return (grad_out * ga).to(a.dtype), (grad_out * gb).to(b.dtype), scale_grad, None


class _TiledRowCE(torch.autograd.Function):
    """sum_i CE(s * q_i . k_J, positive column offset + i) over an (m, B) strip, in (t, t) tiles."""

    @staticmethod
    def forward(
        ctx, q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, offset: int, tile: int
    ) -> torch.Tensor:
        q32, k32, s = q.float(), k.float(), scale.float()
        m, n = q.shape[0], k.shape[0]
        lse = torch.full((m,), float("-inf"), device=q.device)
        pos = (q32 * k32[offset : offset + m]).sum(-1) * s  # (m,)
        for i0, i1 in _tiles(m, tile):
            for j0, j1 in _tiles(n, tile):
                logits = s * q32[i0:i1] @ k32[j0:j1].T  # (t, t)
                lse[i0:i1] = torch.logaddexp(lse[i0:i1], torch.logsumexp(logits, dim=1))
        ctx.save_for_backward(q, k, scale, lse)
        ctx.offset, ctx.tile = offset, tile
        return (lse - pos).sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, scale, lse = ctx.saved_tensors
        q32, k32, s = q.float(), k.float(), scale.float()
        m, n, t = q.shape[0], k.shape[0], ctx.tile
        gq, gk = torch.zeros_like(q32), torch.zeros_like(k32)
        gs = torch.zeros((), device=q.device)
        for i0, i1 in _tiles(m, t):
            for j0, j1 in _tiles(n, t):
                dots = q32[i0:i1] @ k32[j0:j1].T  # (t, t)
                g = torch.exp(s * dots - lse[i0:i1, None])  # softmax over the row's columns
                g.diagonal(ctx.offset + i0 - j0).sub_(1.0)  # the positives (i, offset + i), if in this tile
                gq[i0:i1] += s * g @ k32[j0:j1]
                gk[j0:j1] += s * g.T @ q32[i0:i1]
                gs += (g * dots).sum()
        scale_grad = grad_out * gs if ctx.needs_input_grad[2] else None
        return (grad_out * gq).to(q.dtype), (grad_out * gk).to(k.dtype), scale_grad, None, None


def tiled_info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    tile: int = 4096,
    rows: Rows | None = None,
) -> torch.Tensor:
    """`info_nce(a, b, logit_scale)` in O(B * tile) memory; a, b: (B, E) normalised, same B. With
    `rows` (the local loss), only those rows' terms, in both directions (see `Rows.mean`)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a and b must be (B, E) of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if tile < 1:
        raise ValueError(f"tile must be at least 1, got {tile}")
    if rows is None or rows.count == rows.total:
        loss = _TiledInfoNCE.apply(a, b, logit_scale, tile)
        return loss if rows is None else rows.world * loss
    ab = _TiledRowCE.apply(rows.take(a), b, logit_scale, rows.start, tile)
    ba = _TiledRowCE.apply(rows.take(b), a, logit_scale, rows.start, tile)
    return 0.5 * rows.mean(ab + ba)
