"""Word-region alignment (UNITER's WRA, Chen et al. 2020, arXiv:1909.11740) by optimal transport,
solved with the inexact proximal point method (IPOT, Xie et al. 2018, arXiv:1802.04307).

For a matched pair, the fused word tokens w_1..w_n and region (patch) tokens v_1..v_m are two point
clouds with uniform mass over their real tokens. The cost of moving word i to region j is
C_ij = 1 - cos(w_i, v_j); the transport plan T (n, m) with row sums mu = 1/n and column sums
nu = 1/m that minimises <T, C> is the optimal alignment, and the loss is that distance, averaged
over the batch's matched pairs: training pulls every word towards the regions it is transported to.

IPOT finds T by proximal point steps, each an entropic OT problem solved inexactly (K Sinkhorn
sweeps) with the previous plan as prior:

    G = exp(-C / beta);  T = 1 1^T;  b = 1/m
    repeat N times:  Q = G * T;  K times: a = mu / (Q b), b = nu / (Q^T a);  T = diag(a) Q diag(b)

Unlike Sinkhorn's entropic plan, IPOT converges to the exact (unregularised) OT plan for any beta,
which is why UNITER uses it (beta = 0.5, N = 50, K = 1). T is computed without gradients (UNITER
and the IPOT paper do the same: the plan is the argmin, and by the envelope theorem the gradient of
the OT distance with respect to C is T itself); the gradient flows through C. Padding gets zero
mass (a padded word's row of T is 0), so neither the amount of padding nor the padded values change
the loss. The text's first token (<bos>, the fused [CLS]) and the image's prefix tokens are not
words or regions and are left out, as UNITER leaves out [CLS] and [SEP].

With the single-stream part (UNITER's) both sides are fused tokens. A cross-attention part (ALBEF's)
fuses the query side only: the other side is then the context's tokens as its layers read them
(`Fusion.context_tokens`, projected to the fusion width), so the fused words align to the patches
they attend to.
"""

from __future__ import annotations

from typing import Any

import pydantic
import torch
import torch.nn.functional as F

from coalign.models.model import Features
from coalign.objectives.base import FusedObjective, FusedOptions, paired_tokens
from coalign.objectives.distributed import own_rows
from coalign.registry import OBJECTIVES


@torch.no_grad()
def ipot(
    cost: torch.Tensor,
    mu: torch.Tensor,
    nu: torch.Tensor,
    beta: float = 0.5,
    iterations: int = 50,
    inner: int = 1,
) -> torch.Tensor:
    """(B, n, m) transport plans for (B, n, m) costs and marginals mu (B, n), nu (B, m) (each summing
    to 1; zero mass on padding). See the module docstring."""
    cost, mu, nu = cost.float(), mu.float(), nu.float()
    G = torch.exp(-cost / beta)  # (B, n, m)
    T = torch.ones_like(cost)
    b = nu.clone()
    for _ in range(iterations):
        Q = G * T
        for _ in range(inner):
            a = mu / (Q @ b[..., None]).squeeze(-1).clamp_min(1e-30)  # (B, n)
            b = nu / (Q.transpose(1, 2) @ a[..., None]).squeeze(-1).clamp_min(1e-30)  # (B, m)
        T = a[..., None] * Q * b[:, None, :]
    return T


def uniform_mass(valid: torch.Tensor) -> torch.Tensor:
    """(B, N) bool -> (B, N) uniform mass over the True entries (rows without any: zeros)."""
    v = valid.float()
    return v / v.sum(-1, keepdim=True).clamp_min(1)


def wra_distance(
    words: torch.Tensor,
    regions: torch.Tensor,
    word_mask: torch.Tensor,
    region_mask: torch.Tensor,
    beta: float = 0.5,
    iterations: int = 50,
    inner: int = 1,
) -> torch.Tensor:
    """(B,) OT distances <T*, C> between (B, n, D) words and (B, m, D) regions with (B, n), (B, m)
    bool masks of real tokens; the gradient flows through C only."""
    cost = 1 - F.normalize(words.float(), dim=-1) @ F.normalize(regions.float(), dim=-1).transpose(1, 2)
    T = ipot(cost.detach(), uniform_mass(word_mask), uniform_mass(region_mask), beta, iterations, inner)
    return (T * cost).sum((1, 2))


class WRAConfig(FusedOptions):
    beta: float = pydantic.Field(0.5, gt=0)  # IPOT's proximal step (UNITER: 0.5)
    iterations: int = pydantic.Field(50, ge=1)  # proximal point steps N (UNITER: 50)
    inner: int = pydantic.Field(1, ge=1)  # Sinkhorn sweeps per step K (UNITER: 1)
    words: str = "text"  # the batch key whose tokens are the words (the other's are the regions)

    @pydantic.model_validator(mode="after")
    def _words_paired(self):
        if self.words not in self.modalities:
            raise ValueError(f"words '{self.words}' must be one of modalities {list(self.modalities)}")
        return self


@OBJECTIVES.register("wra")
class WRA(FusedObjective):
    Config = WRAConfig
    name = "wra"

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        fusion = self.model.fusion
        q, c = fusion.query, fusion.context
        tq, tc = paired_tokens(features, batch, q, c)  # matched pairs only: (M, Nq, D), (M, Nc, D)
        own = own_rows(batch, (q, c), tq.tokens.shape[0])  # each rank aligns its own pairs (local loss)
        tq, tc = own.pick_tokens(tq), own.pick_tokens(tc)
        fused = self.model.fuse({q: tq, c: tc})  # (M, Nq [+ Nc], D)
        nq = tq.tokens.shape[1]
        valid = torch.ones(fused.tokens.shape[:2], dtype=torch.bool, device=fused.tokens.device)
        valid = valid if fused.mask is None else fused.mask
        if fusion.both_streams:  # single stream: the context's fused rows follow the query's
            context = (fused.tokens[:, nq:], valid[:, nq:])
        else:  # cross attention: the context as the layers read it
            ct = fusion.context_tokens(tc)
            context = (
                ct.tokens,
                torch.ones_like(ct.tokens[..., 0], dtype=torch.bool) if ct.mask is None else ct.mask,
            )
        side = {q: (fused.tokens[:, :nq], valid[:, :nq]), c: context}
        words, word_mask = side[self.cfg.words]
        other = c if self.cfg.words == q else q
        regions, region_mask = side[other]
        skip_w = 1 if self.cfg.words == q else int(self.model.towers[self.cfg.words].num_prefix_tokens)
        skip_r = 1 if other == q else int(self.model.towers[other].num_prefix_tokens)
        word_mask, region_mask = word_mask.clone(), region_mask.clone()
        word_mask[:, :skip_w] = False  # the fused [CLS] / a tower's prefix tokens: no word, no region
        region_mask[:, :skip_r] = False
        cfg = self.cfg
        dist = wra_distance(words, regions, word_mask, region_mask, cfg.beta, cfg.iterations, cfg.inner)
        return {"wra_loss": own.share(dist.mean())}
