"""Image-text matching (ITM) with in-batch hard negatives (ALBEF, Li et al. 2021, arXiv:2107.07651).

A binary head on the fused [CLS] (`MultimodalModel.fuse`, row 0; the fusion part's `match_head`)
tells matched pairs from mismatched ones. Each of the M pairs of the batch gives three fused inputs:

    (a_i, b_i)         label 1, the positive
    (a_i, b_neg(i))    label 0, b_neg(i) drawn with probability softmax_j(sim[i, j] / t)
    (a_neg(j), b_j)    label 0, a_neg(j) drawn with probability softmax_i(sim[i, j] / t)

`sim` are the cosine similarities of the pairs' embeddings (the contrastive space), detached: they
choose negatives, they do not train. A draw is never the positive, nor any sample whose caption
(the token ids of `caption_key`) equals the positive's: that sample is a positive too, and calling
it a mismatch would teach the head noise. A row with no admissible negative at all (every sample
of the batch shares its caption) contributes its positive only. The draws use torch's global RNG
(checkpointed with the run, so resume draws the same negatives) unless a test sets `generator`.

Under several ranks the negatives are drawn from the global batch, and each rank fuses only the
pairs of its own rows (the local loss of `objectives/distributed.py`): the fusion part runs on 3M/W
pairs per rank instead of every rank fusing all 3M.
"""

from __future__ import annotations

from typing import Any

import pydantic
import torch
import torch.nn.functional as F

from coalign.data.sample import present_rows
from coalign.models.model import Features
from coalign.objectives.base import FusedObjective, FusedOptions, paired, paired_tokens, take_rows
from coalign.objectives.distributed import own_rows
from coalign.registry import OBJECTIVES


class ITMConfig(FusedOptions):
    batch_key_fields = ("modalities", "caption_key")

    # t: the softmax temperature of the hard-negative draw (ALBEF reuses its ITC temperature, ~0.07)
    temperature: float = pydantic.Field(0.07, gt=0)
    # the batch key whose inputs are the captions; samples with equal ids there are not negatives
    caption_key: str = "text"

    @pydantic.model_validator(mode="after")
    def _caption_is_paired(self):
        if self.caption_key not in self.modalities:
            raise ValueError(
                f"caption_key '{self.caption_key}' must be one of modalities {list(self.modalities)}"
            )
        return self


def same_rows(ids: torch.Tensor) -> torch.Tensor:
    """(M, L) ids -> (M, M) bool: rows i and j hold the same ids (the diagonal is True)."""
    return (ids[:, None, :] == ids[None, :, :]).flatten(2).all(-1)


def hard_negatives(
    sim: torch.Tensor, exclude: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One column per row of `sim` (M, K), drawn with probability softmax(sim[i] / t) renormalised
    over the columns not `exclude`d (M, K bool). Returns (M,) column indices and (M,) bool: the rows
    that had an admissible column (the others' index is meaningless).

    The excluded columns are set to -inf before the softmax, not zeroed after it: a zeroed softmax
    can underflow to an all-zero row although admissible columns exist."""
    valid = ~exclude.all(dim=1)  # (M,)
    logits = (sim.float() / temperature).masked_fill(exclude, float("-inf"))
    logits = torch.where(valid[:, None], logits, torch.zeros_like(logits))  # any draw; discarded below
    probs = torch.softmax(logits, dim=1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1), valid


@OBJECTIVES.register("itm")
class ITM(FusedObjective):
    Config = ITMConfig
    name = "itm"
    needs_inputs = True  # the caption ids decide which samples are no negatives (gathered across ranks)

    def __init__(self, cfg: ITMConfig | None = None, **kwargs: Any):
        super().__init__(cfg, **kwargs)
        self.generator: torch.Generator | None = None  # None: torch's global RNG

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        a, b = self.cfg.modalities
        ta, tb = paired_tokens(features, batch, a, b)  # (M, Na, Da), (M, Nb, Db)
        ea, eb = paired(features, batch, a, b)  # (M, E) each, L2-normalised
        rows = dict(zip((a, b), present_rows(batch, (a, b)), strict=True))[self.cfg.caption_key]
        ids = batch[self.cfg.caption_key]
        ids = ids if rows is None else ids[rows.to(ids.device)]  # (M, L)
        M = ea.shape[0]
        with torch.no_grad():
            sim = ea.detach().float() @ eb.detach().float().T  # (M, M): rows a, columns b
            same = same_rows(ids.to(sim.device))  # (M, M), symmetric, True on the diagonal
            neg_b, ok_a = hard_negatives(sim, same, self.cfg.temperature, self.generator)  # b for each a
            neg_a, ok_b = hard_negatives(sim.T, same, self.cfg.temperature, self.generator)  # a for each b
            # P pairs in all: whether a row has a negative depends on the captions only, not on the
            # draw, so every rank counts the same P without communicating
            P = M + int(ok_a.sum() + ok_b.sum())
        # this rank fuses the pairs of its own rows (local loss; all of them in one process): the
        # positives and the negative of each own a_i and of each own b_j, which may be other ranks' rows
        own = own_rows(batch, (a, b), M)
        mine = own.index(sim.device)
        ok_a, ok_b = own.take(ok_a), own.take(ok_b)
        ia = torch.cat([mine, mine[ok_a], own.take(neg_a)[ok_b]])  # (p,) rows of a in each fused pair
        ib = torch.cat([mine, own.take(neg_b)[ok_a], mine[ok_b]])  # (p,) rows of b
        labels = torch.zeros(ia.shape[0], dtype=torch.long, device=sim.device)
        labels[: own.count] = 1
        fused = self.model.fuse({a: take_rows(ta, ia), b: take_rows(tb, ib)})
        logits = self.model.fusion.match_logits(fused)  # (p, 2): the fusion part's matching head
        labels = labels.to(logits.device)
        loss = own.mean(F.cross_entropy(logits, labels, reduction="none"), total=P)
        accuracy = own.mean((logits.argmax(-1) == labels).float(), total=P)
        return {"itm_loss": loss, "accuracy": accuracy.detach()}
