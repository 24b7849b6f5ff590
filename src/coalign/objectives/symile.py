"""Symile: contrast all modalities at once through their multilinear inner product (Saporta et al.
2024, "Contrasting with Symile: Simple Model-Agnostic Representation Learning for Unlimited
Modalities"; reference code github.com/rajesh-lab/symile, `symile/losses.py` and the pip package's
`Symile` loss, which this module follows).

For k modalities with embeddings x^1..x^k (N, E) of N row-aligned samples,

    MIP(x^1_i, ..., x^k_i) = sum_d prod_m x^m_{i,d}

generalises the dot product (k = 2 gives CLIP's logit). Pairwise CLIP terms only see pairwise
information; Symile's loss is a lower bound on the total correlation of all k modalities, so it also
learns what only holds jointly (e.g. an XOR of three variables). Each modality m takes a turn as the
anchor: row i holds x^m_i, and its candidates are tuples of the *other* modalities; the positive is
the sample's own tuple, the negatives are tuples whose parts come from different samples (drawn from
the product of the marginals, which is what makes the bound one on total correlation). Per anchor,

    L_m = mean_i CE(scale * [MIP(x^m_i, candidate_c)]_c, positive)      loss = mean_m L_m

Two candidate sets (`negatives`):

- "n" (O(N) negatives, the reference's default): each other modality's rows are shuffled by its own
  random permutation pi_o; column j is the tuple (x^o_{pi_o(j)})_o, and the diagonal (column i) is
  replaced by the positive tuple. Logits (N, N). A shuffled tuple can by chance equal the positive
  (a rare false negative), as in the reference.
- "n_squared" (the reference's O(N^2) for three modalities; N^(k-1) in general): every combination
  of rows of the other modalities is a candidate. Logits (N, N^(k-1)), so memory grows as
  N^(k-1) * E: use it for three modalities and moderate batches.

Departures from the reference, both deliberate: the general (k > 3) O(N^2) reference detaches the
non-anchor products (gradients reach them only when they are the anchor), here every term is
differentiated; and embeddings are the model's L2-normalised ones (the reference uses LayerNorm
outputs), so |MIP| <= 1 and the learnable temperature (CLIP's parametrisation, as the reference
also learns it) sets the logit range.

Local loss (several ranks): each rank computes the anchors' terms of its own rows against every
candidate tuple of the gathered batch; the permutations are rank 0's draw, so all ranks share the
negatives.

Missing modalities: the term uses only the samples that have every bound modality (`aligned`); with
fewer than 2 such samples the loss is a zero attached to the graph (see `binding.attached_zero`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from coalign.models.model import Features
from coalign.objectives.base import aligned
from coalign.objectives.binding import BindingObjective, BindingOptions, check_single
from coalign.objectives.distributed import Rows, from_rank_zero, own_rows
from coalign.registry import OBJECTIVES


class SymileConfig(BindingOptions):
    negatives: Literal["n", "n_squared"] = "n"


def multilinear_inner_product(*xs: torch.Tensor) -> torch.Tensor:
    """MIP of row-aligned (N, E) tensors: (N,) = sum_d prod_m x^m_{:, d}."""
    prod = xs[0]
    for x in xs[1:]:
        prod = prod * x
    return prod.sum(dim=-1)


def draw_permutations(
    k: int, n: int, device: torch.device | None = None, generator: torch.Generator | None = None
) -> list[list[torch.Tensor]]:
    """For each of k anchors, one random permutation of n rows per other modality (k - 1 of them)."""
    return [[torch.randperm(n, device=device, generator=generator) for _ in range(k - 1)] for _ in range(k)]


def symile_logits_n(
    anchor: torch.Tensor,
    others: Sequence[torch.Tensor],
    permutations: Sequence[torch.Tensor],
    rows: Rows | None = None,
) -> torch.Tensor:
    """(N, N): [i, j] = MIP(anchor_i, *(o[perm_o[j]] for o)) for j != i, the positive MIP at j == i.
    With `rows`, only those rows i: (m, N)."""
    rows = rows or Rows.every(anchor.shape[0])
    shuffled = others[0][permutations[0]]
    for o, perm in zip(others[1:], permutations[1:], strict=True):
        shuffled = shuffled * o[perm]  # (N, E): column j's negative tuple, multiplied out
    mine = rows.take(anchor)
    logits = mine @ shuffled.T  # (m, N)
    positive = multilinear_inner_product(mine, *(rows.take(o) for o in others))  # (m,)
    eye = rows.index(anchor.device)[:, None] == torch.arange(anchor.shape[0], device=anchor.device)
    return torch.where(eye, positive[:, None], logits)  # [r, start + r] = positive[r]


def symile_logits_n_squared(anchor: torch.Tensor, others: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(N, N^(k-1)) logits over every combination of the other modalities' rows, and the stride s such
    that row i's positive (all parts from sample i) sits in column i * s. The anchor may be some rows
    (m, E) of the N (the local loss): its logits are then (m, N^(k-1)), the stride the same."""
    n, e = others[0].shape  # the candidates' rows (the anchor may hold only some of its rows)
    combos = others[0]  # (N, E)
    for o in others[1:]:
        # Row index j_1 * N^(r-1) + ... + j_r: the product of rows j_1 .. j_r.
        combos = (combos[:, None, :] * o[None, :, :]).reshape(-1, e)
    stride = sum(n**p for p in range(len(others)))  # (j, j, ..., j) -> j * stride
    return anchor @ combos.T, stride


def symile_loss(
    embeddings: Sequence[torch.Tensor],
    logit_scale: torch.Tensor,
    negatives: Literal["n", "n_squared"] = "n",
    permutations: Sequence[Sequence[torch.Tensor]] | None = None,
    rows: Rows | None = None,
) -> torch.Tensor:
    """Symile loss of k row-aligned (N, E) embeddings: mean over anchors of the cross-entropy above.

    `permutations[m]` (for negatives "n"): the k - 1 row permutations of the other modalities (in
    order) when modality m is the anchor; drawn at random when None (`draw_permutations`).
    `rows`: the local loss, those rows' terms of every anchor (see `Rows.mean`).
    """
    k, n = len(embeddings), embeddings[0].shape[0]
    if k < 2:
        raise ValueError(f"symile needs at least two modalities, got {k}")
    if negatives == "n" and permutations is None:
        permutations = draw_permutations(k, n, embeddings[0].device)
    if negatives not in ("n", "n_squared"):
        raise ValueError(f"negatives must be 'n' or 'n_squared', got {negatives!r}")
    # At least float32, autocast off: a MIP sums E products of k coordinates of size ~E^-1/2 each,
    # small terms that bf16's 8-bit mantissa would blur.
    dtype = torch.promote_types(embeddings[0].dtype, torch.float32)
    xs = [x.to(dtype) for x in embeddings]
    share = rows or Rows.every(n)
    mine = share.index(xs[0].device)
    losses = []
    with torch.autocast(device_type=xs[0].device.type, enabled=False):
        for m in range(k):
            others = xs[:m] + xs[m + 1 :]
            if negatives == "n":
                logits, target = symile_logits_n(xs[m], others, permutations[m], share), mine
            else:
                logits, stride = symile_logits_n_squared(share.take(xs[m]), others)
                target = mine * stride
            losses.append(share.mean(F.cross_entropy(logit_scale * logits, target, reduction="none")))
    return torch.stack(losses).mean()


@OBJECTIVES.register("symile")
class Symile(BindingObjective):
    Config = SymileConfig
    name = "symile"

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        modalities = self.joint(features) or []
        scale = self.scale()
        xs = aligned(features, batch, modalities) if len(modalities) >= 2 else ()
        for m, x in zip(modalities, xs, strict=False):
            check_single(self.name, m, x)
        rows = xs[0].shape[0] if xs else 0
        if rows < 2:
            loss = self.zero(scale, features, self.bound(features))  # nothing to contrast here
        else:
            share = own_rows(batch, modalities, rows)
            draws = None
            if self.cfg.negatives == "n" and share.world > 1:  # one draw, rank 0's, for every rank
                draws = torch.stack([torch.stack(p) for p in draw_permutations(len(xs), rows, xs[0].device)])
                draws = from_rank_zero(draws)  # (k, k - 1, N)
            loss = symile_loss(xs, scale, self.cfg.negatives, draws, share)
        return {"symile_loss": loss, "logit_scale": scale.detach(), "rows": torch.tensor(float(rows))}
