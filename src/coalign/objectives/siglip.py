"""Pairwise sigmoid loss between two modalities (SigLIP, Zhai et al. 2023), plain and chunked.

Every pair (i, j) of the batch is an independent binary classification: positive when i == j,
negative otherwise. With logits x_ij = scale * a_i . b_j + bias and labels z_ij = +-1,

    L = -(1/B) sum_{i,j} log sigmoid(z_ij x_ij) = (1/B) sum_{i,j} softplus(-z_ij x_ij)

(normalised by B, as OpenCLIP does). The sum splits over column blocks of b, so the chunked form
only ever holds a (B, chunk) block of logits, in the forward and (through per-block checkpointing)
in the backward.

Under several ranks the sum also splits over rows, and nothing is gathered (the SigLIP paper's
chunked scheme, sec. 3.3): each rank scores its own images against its own texts (the positives),
then passes the texts it holds to the next rank around a ring, W - 1 times, scoring each incoming
block as negatives. A rank never holds more than its own rows and one neighbour's block of texts; the
ring's backward sends each block's gradient back the way it came, so every text's gradient reaches
the rank that encoded it. The objective therefore takes this rank's own features (`exchanges`),
and returns W * its share, as the local losses do (objectives/distributed.py).
"""

from __future__ import annotations

from typing import Any

import pydantic
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from coalign.models.model import Features
from coalign.objectives.base import LearnedScale, Objective, ObjectiveConfig, paired
from coalign.objectives.distributed import parts, rank, world_size
from coalign.registry import OBJECTIVES


class SigLIPConfig(ObjectiveConfig):
    modalities: tuple[str, str] = ("image", "text")
    init_logit_scale: float = pydantic.Field(10.0, gt=0)  # SigLIP: t' = ln 10, so the scale starts at 10
    init_logit_bias: float = -10.0  # starts every pair near "negative", as ~all B^2 - B pairs are
    max_logit_scale: float = pydantic.Field(100.0, gt=0)  # the clamp OpenCLIP's trainer applies to all
    learn_temperature: bool = True
    learn_bias: bool = True
    chunk_size: int | None = pydantic.Field(None, gt=0)  # columns of b per block; None = the plain loss


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"siglip needs row-aligned (B, E) embeddings, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _block_loss(
    scaled_a: torch.Tensor, b_block: torch.Tensor, bias: torch.Tensor, start: int | None
) -> torch.Tensor:
    """sum over one column block of -log sigmoid(z_ij x_ij); the block holds columns start.. of b
    (start None: another rank's texts, negatives only).

    `scaled_a` is scale * a: scaling the (B, E) side rather than the logits means autograd keeps
    no (B, chunk) product around just for the scale's gradient.
    """
    # Under autocast the matmul runs in bf16/fp16; the bias, softplus and the sum over B * chunk
    # terms still run in (at least) fp32, as cross_entropy does for InfoNCE.
    x = (scaled_a @ b_block.T).to(torch.promote_types(scaled_a.dtype, torch.float32)) + bias  # (B, chunk)
    # Positives (i == j) sit at rows start + k, columns k. Flipping their sign in place gives
    # -z * x without a (B, chunk) label matrix, and softplus keeps both tails exact (unlike
    # softplus(x) - x for the positives, which loses precision once x is large).
    if start is not None:
        x.diagonal(-start).neg_()
    return F.softplus(x).sum()  # softplus(-z x) = -log sigmoid(z x)


def siglip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SigLIP loss of row-aligned a, b: (B, E) (normalised); `scale` is the exponentiated temperature.

    Materialises the full (B, B) logits; `chunked_siglip_loss` gives the same value and gradient
    in (B, chunk) memory. An empty batch gives 0 (a sum of no terms), not NaN.
    """
    _check(a, b)
    return _block_loss(scale * a, b, bias, 0) / max(a.shape[0], 1)


def chunked_siglip_loss(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, chunk: int
) -> torch.Tensor:
    """`siglip_loss` computed over column blocks of b, holding at most (B, chunk) logits at a time.

    Each block is checkpointed: its forward keeps only its inputs (scale * a, a view of b, bias) and
    its backward recomputes that block's logits, so the backward too peaks at one block rather
    than keeping every block's logits alive until the end. The price is one extra (B, chunk) matmul
    per block in the backward.
    """
    _check(a, b)
    if chunk <= 0:
        raise ValueError(f"chunk must be a positive number of columns, got {chunk}")
    return _columns_loss(scale * a, b, bias, chunk, positives=True) / max(a.shape[0], 1)


def _columns_loss(
    scaled_a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor, chunk: int | None, positives: bool
) -> torch.Tensor:
    """The sum of the terms of every (row of a, row of b), in checkpointed column blocks of `chunk`
    (None: one block, not checkpointed); `positives`: b's row i is a's row i's positive."""
    if chunk is None:
        return _block_loss(scaled_a, b, bias, 0 if positives else None)
    needs_graph = torch.is_grad_enabled() and any(t.requires_grad for t in (scaled_a, b, bias))
    total = None
    # An empty batch still runs one (empty) block, so its zero loss stays attached to the graph.
    for start in range(0, b.shape[0], chunk) or [0]:
        block = b[start : start + chunk]  # (chunk, E) view, no copy
        where = start if positives else None
        if needs_graph:
            # No randomness inside a block, so there is no RNG state to stash and restore.
            part = checkpoint(
                _block_loss, scaled_a, block, bias, where, use_reentrant=False, preserve_rng_state=False
            )
        else:
            part = _block_loss(scaled_a, block, bias, where)
        total = part if total is None else total + part
    return total


class _Pass(torch.autograd.Function):
    """Around the ring: send x to the next rank, receive the previous rank's block (`rows` rows of
    x's trailing shape). Backward: the gradient goes back, to the previous rank, and ours comes from
    the next."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return _exchange(x, rows, to=+1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.rows, to=-1), None


def _exchange(x: torch.Tensor, rows: int, to: int) -> torch.Tensor:
    """Send x to rank + to, receive `rows` rows from rank - to (point to point; an empty block is
    neither sent nor received, both ends know its size)."""
    w, r = world_size(), rank()
    out = x.new_empty((rows, *x.shape[1:]))
    ops = []
    if x.shape[0]:
        ops.append(dist.P2POp(dist.isend, x.contiguous(), (r + to) % w))
    if rows:
        ops.append(dist.P2POp(dist.irecv, out, (r - to) % w))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return out


def ring_siglip_loss(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """This rank's part of the global batch's SigLIP loss, times W (its mean over the ranks is the
    loss): its rows a, b (m, E) against its own texts, then against every other rank's, passed
    around the ring. Call on every rank, in step."""
    _check(a, b)
    w = world_size()
    count = torch.tensor([a.shape[0]], device=a.device)
    counts = [torch.empty_like(count) for _ in range(w)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in torch.cat(counts).tolist()]
    scaled_a = scale * a  # (m, E)
    total = _columns_loss(scaled_a, b, bias, chunk, positives=True)
    held = b
    for step in range(1, w):  # after `step` passes we hold the texts of rank - step
        held = _Pass.apply(held, counts[(rank() - step) % w])
        total = total + _columns_loss(scaled_a, held, bias, chunk, positives=False)
    return total * (w / max(sum(counts), 1))


def _own_pairs(
    features: dict[str, Features], batch: dict[str, Any], keys: tuple[str, str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's paired rows for the ring; a rank with no rows of a key (another rank may have
    them) still takes part, with zero rows that carry a gradient, so that every rank runs the ring's
    passes forward and backward."""
    if all(k in features for k in keys):
        return paired(features, batch, *keys)
    if not features:
        raise KeyError(f"objective needs modalities {list(keys)}, but this rank's batch has none")
    ref = next(iter(features.values())).embedding
    empty = ref.new_zeros((0, ref.shape[-1]))
    return empty.clone().requires_grad_(), empty.clone().requires_grad_()


@OBJECTIVES.register("siglip")
class SigLIP(LearnedScale, Objective):
    Config = SigLIPConfig
    name = "siglip"
    exchanges = True  # under several ranks: handed this rank's own features, runs the ring itself

    def __init__(self, cfg: SigLIPConfig | None = None, **kwargs: Any):
        super().__init__(cfg, **kwargs)
        self.init_scale(self.cfg.init_logit_scale, self.cfg.max_logit_scale, self.cfg.learn_temperature)
        self.logit_bias = nn.Parameter(
            torch.tensor(self.cfg.init_logit_bias), requires_grad=self.cfg.learn_bias
        )

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        scale, bias = self.scale(), self.logit_bias
        if parts(batch) > 1:  # this rank's part of the global batch (the Task under several ranks)
            a, b = _own_pairs(features, batch, self.cfg.modalities)
            loss = ring_siglip_loss(a, b, scale, bias, self.cfg.chunk_size)
        else:
            a, b = paired(features, batch, *self.cfg.modalities)
            if self.cfg.chunk_size is None:
                loss = siglip_loss(a, b, scale, bias)
            else:
                loss = chunked_siglip_loss(a, b, scale, bias, self.cfg.chunk_size)
        return {"siglip_loss": loss, "logit_scale": scale.detach(), "logit_bias": bias.detach()}
