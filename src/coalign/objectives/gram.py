"""GRAM: contrast an anchor with the tuple of the other modalities by the volume they span (Cicchetti
et al., "Gramian Multimodal Representation Learning and Alignment", ICLR 2025; reference code
github.com/ispamm/GRAM, `utils/volume.py` and `model/gram.py`, which this module follows).

For k unit vectors v_1..v_k (the columns of A, E x k), the Gram matrix G = A^T A (k x k) holds their
pairwise cosines, and

    Vol(v_1, ..., v_k) = sqrt(det G)

is the volume of the parallelotope they span: 0 when the vectors are aligned (linearly dependent),
at most 1 when they are orthogonal. With k = 2 it is sin(angle), a monotone stand-in for the
cosine. One volume measures how well all k modalities agree at once, where pairwise cosines need
k(k-1)/2 numbers.

The loss contrasts the anchor a (text in the paper) of sample i with the tuple t_j of the other
modalities of sample j, using -Vol / temperature as the logit (a small volume = a match):

    V_ij = sqrt(|det G(a_i, t_j)| + eps)                                  (N_anchor, N_tuple)
    loss = 1/2 ( CE(-scale * V, diag) + CE(-scale * V^T, diag) )        anchor->tuple and back

As the reference: the tuple keeps its own modalities together (negatives swap the whole tuple, not
its parts), the cross-entropies use label smoothing 0.1 (`label_smoothing`), and |det| absorbs
rounding below 0. Additions: `eps` inside the square root keeps the gradient finite when a tuple is
exactly aligned (d sqrt(x)/dx is infinite at 0; the reference has no guard there), and the
temperature is CLIP's learnable log-scale (the reference learns the temperature 0.07 itself).
The Gram matrices and determinants run in at least float32 with autocast off (the reference computes
`torch.det(G.float())`).

Local loss (several ranks): this rank's anchors against every tuple, and its tuples against every
anchor: (m, N) volumes each way rather than (N, N).

Missing modalities: only the samples that have the anchor and every other bound modality take part
(`aligned`); with fewer than 2 of them the loss is a zero attached to the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pydantic
import torch
import torch.nn.functional as F

from coalign.models.model import Features
from coalign.objectives.base import aligned
from coalign.objectives.binding import AnchorOptions, BindingObjective, check_single
from coalign.objectives.contrastive import whole
from coalign.objectives.distributed import Rows, own_rows
from coalign.registry import OBJECTIVES


class GRAMConfig(AnchorOptions):
    anchor: str = "text"  # the paper anchors on text
    label_smoothing: float = pydantic.Field(0.1, ge=0.0, lt=1.0)  # the reference's value
    eps: float = pydantic.Field(1e-8, ge=0.0)  # under the square root, for a finite gradient at Vol = 0


def gram_matrices(anchor: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N_a, N_t, k, k) Gram matrices of [anchor_i, others[0]_j, ..., others[k-2]_j] for every (i, j).

    Only the first row and column depend on i; the others' block is one (k-1, k-1) matrix per j, so
    this costs N_a N_t k^2 numbers rather than the N_a N_t k E of stacking the vectors themselves.
    """
    t = torch.stack(list(others), dim=1)  # (N_t, k-1, E)
    na, nt, m = anchor.shape[0], t.shape[0], t.shape[1]
    aa = (anchor * anchor).sum(-1)  # (N_a,)
    cross = torch.einsum("ie,jme->ijm", anchor, t)  # (N_a, N_t, k-1): anchor_i . other_m_j
    inner = t @ t.transpose(1, 2)  # (N_t, k-1, k-1)
    first_row = torch.cat([aa[:, None, None].expand(na, nt, 1), cross], dim=-1)  # (N_a, N_t, k)
    rest = torch.cat([cross[..., None], inner[None].expand(na, nt, m, m)], dim=-1)  # (N_a, N_t, k-1, k)
    return torch.cat([first_row[:, :, None, :], rest], dim=2)  # (N_a, N_t, k, k)


def gram_volume(anchor: torch.Tensor, others: Sequence[torch.Tensor], eps: float = 1e-8) -> torch.Tensor:
    """(N_a, N_t) volumes sqrt(|det G| + eps) spanned by anchor_i and the tuple (o_j for o in others)."""
    # At least float32 and autocast off: a matching tuple's det G is a small difference of products
    # of cosines, which bf16's 8-bit mantissa would drown.
    dtype = torch.promote_types(anchor.dtype, torch.float32)
    with torch.autocast(device_type=anchor.device.type, enabled=False):
        g = gram_matrices(anchor.to(dtype), [o.to(dtype) for o in others])
        return torch.sqrt(torch.linalg.det(g).abs() + eps)


def gram_loss(
    anchor: torch.Tensor,
    others: Sequence[torch.Tensor],
    logit_scale: torch.Tensor,
    label_smoothing: float = 0.1,
    eps: float = 1e-8,
    rows: Rows | None = None,
) -> torch.Tensor:
    """Symmetric volume contrastive loss of row-aligned anchor (N, E) and others [(N, E), ...];
    with `rows`, the local loss of those rows (see `Rows.mean`)."""
    if whole(rows):
        logits = -logit_scale * gram_volume(anchor, others, eps)  # (N, N): anchor i vs tuple j
        target = torch.arange(anchor.shape[0], device=anchor.device)
        loss = 0.5 * (
            F.cross_entropy(logits, target, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.T, target, label_smoothing=label_smoothing)
        )
        return loss if rows is None else rows.world * loss
    target = rows.index(anchor.device)
    to_tuples = -logit_scale * gram_volume(rows.take(anchor), others, eps)  # (m, N)
    to_anchors = -logit_scale * gram_volume(anchor, [rows.take(o) for o in others], eps).T  # (m, N)
    per_row = F.cross_entropy(to_tuples, target, label_smoothing=label_smoothing, reduction="none")
    per_row = per_row + F.cross_entropy(to_anchors, target, label_smoothing=label_smoothing, reduction="none")
    return 0.5 * rows.mean(per_row)


@OBJECTIVES.register("gram")
class GRAM(BindingObjective):
    Config = GRAMConfig
    name = "gram"

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        modalities = self.joint(features) or []
        anchor = self.cfg.anchor
        others = [m for m in modalities if m != anchor]
        scale = self.scale()
        rows = 0
        if anchor in modalities and others:
            xs = aligned(features, batch, [anchor, *others])  # (M, E) each, anchor first
            for m, x in zip([anchor, *others], xs, strict=True):
                check_single(self.name, m, x)
            rows = xs[0].shape[0]
        if rows < 2:
            loss = self.zero(scale, features, self.bound(features))  # nothing to contrast here
        else:
            share = own_rows(batch, [anchor, *others], rows)
            loss = gram_loss(xs[0], xs[1:], scale, self.cfg.label_smoothing, self.cfg.eps, share)
        return {"gram_loss": loss, "logit_scale": scale.detach(), "rows": torch.tensor(float(rows))}
