"""Symmetric InfoNCE between two modalities with a learnable temperature (CLIP, ALIGN), optionally
with soft targets.

The plain loss gives each row a one-hot target (its own pair). Two options soften it, per direction:

- `label_smoothing` eps: target = (1 - eps) onehot + eps / B (Szegedy et al. 2016; used for CLIP by
  PyramidCLIP), so no in-batch negative is pushed to zero probability.
- `self_distill` alpha: target = (1 - alpha) hard + alpha q, where q is the softmax of the model's
  own current in-batch similarities, detached, in the spirit of ALBEF's momentum distillation
  (Li et al. 2021) without the momentum model. q comes from the anchor's own modality: for a->b,
  q_i = softmax_j(scale * a_i . a_j); for b->a, softmax_j(scale * b_i . b_j) (the intra-modal soft
  targets of SoftCLIP, Gao et al. 2024). A pair (i, j) whose anchors look alike (two images of the
  same scene, two near-identical captions) is then a soft positive rather than a hard negative.

  Why not the cross-modal similarities themselves, softmax(scale * a_i . b_j)? That q is exactly the
  prediction p being trained, and for a soft cross-entropy d/dlogits = p - target, so
  p - ((1 - alpha) y + alpha sg(p)) = (1 - alpha)(p - y): the same gradient as the hard loss times
  (1 - alpha), i.e. only a smaller weight. ALBEF escapes this because its q comes from another
  (momentum) model; without one, another view of the same batch has to supply q.

With both options 0 the loss is exactly `info_nce`.

Under several ranks each rank computes the local loss: the terms of its own rows (`Rows`) in both
directions, against every gathered column (objectives/distributed.py).
"""

from __future__ import annotations

from typing import Any

import pydantic
import torch
import torch.nn.functional as F

from coalign.models.model import Features
from coalign.objectives.base import LearnedScale, Objective, TemperatureOptions, paired
from coalign.objectives.distributed import Rows, own_rows
from coalign.objectives.tiled import tiled_info_nce
from coalign.registry import OBJECTIVES


class InfoNCEConfig(TemperatureOptions):
    modalities: tuple[str, str] = ("image", "text")
    label_smoothing: float = pydantic.Field(0.0, ge=0.0, lt=1.0)  # eps of the uniform part of the target
    self_distill: float = pydantic.Field(0.0, ge=0.0, lt=1.0)  # alpha of the self-similarity part
    # Never hold the (B, B) logits: tiles of this size, recomputed in the backward (objectives/tiled.py).
    # For batches of tens of thousands; only with hard targets (no smoothing, no self-distillation).
    tile: int | None = pydantic.Field(None, ge=1)

    @pydantic.model_validator(mode="after")
    def _tile_with_hard_targets(self):
        if self.tile is not None and (self.label_smoothing or self.self_distill):
            raise ValueError("tile works with hard targets only: set label_smoothing and self_distill to 0")
        return self


def whole(rows: Rows | None) -> bool:
    """Does this rank hold every row (one process)? Then the loss is the plain formula, times W."""
    return rows is None or rows.count == rows.total


def info_nce(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, rows: Rows | None = None
) -> torch.Tensor:
    """Mean of the a->b and b->a cross-entropies over in-batch pairs; a, b: (B, E) normalised.
    With `rows`, the local loss: those rows' terms in both directions against every column."""
    if whole(rows):
        logits = logit_scale * a @ b.T  # (B, B); row i's positive is column i
        target = torch.arange(a.shape[0], device=a.device)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        return loss if rows is None else rows.world * loss
    target = rows.index(a.device)  # (m,) each own row's positive column
    ab = logit_scale * rows.take(a) @ b.T  # (m, B)
    ba = logit_scale * rows.take(b) @ a.T  # (m, B)
    per_row = F.cross_entropy(ab, target, reduction="none") + F.cross_entropy(ba, target, reduction="none")
    return 0.5 * rows.mean(per_row)


def soft_targets(
    anchor: torch.Tensor,
    logit_scale: torch.Tensor,
    label_smoothing: float,
    self_distill: float,
    rows: Rows | None = None,
) -> torch.Tensor:
    """(B, B) rows of target probabilities for the anchor's direction (see the module docstring);
    with `rows`, only those rows: (m, B)."""
    B = anchor.shape[0]
    rows = rows or Rows.every(B)
    eye = F.one_hot(rows.index(anchor.device), B).to(anchor.dtype)  # (m, B)
    target = (1.0 - label_smoothing) * eye + label_smoothing / B
    if self_distill > 0:
        with torch.no_grad():  # a target, not a path for gradients
            q = torch.softmax(logit_scale * rows.take(anchor) @ anchor.T, dim=-1)  # (m, B)
        target = (1.0 - self_distill) * target + self_distill * q.to(target.dtype)
    return target


def soft_info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    label_smoothing: float = 0.0,
    self_distill: float = 0.0,
    rows: Rows | None = None,
) -> torch.Tensor:
    """`info_nce` with soft targets: mean over directions of -1/B sum_ij target_ij log p_ij."""
    if label_smoothing == 0 and self_distill == 0:
        return info_nce(a, b, logit_scale, rows)
    if whole(rows):
        logits = logit_scale * a @ b.T  # (B, B)
        ta = soft_targets(a, logit_scale, label_smoothing, self_distill)  # a->b rows
        tb = soft_targets(b, logit_scale, label_smoothing, self_distill)  # b->a rows
        loss = 0.5 * (F.cross_entropy(logits, ta) + F.cross_entropy(logits.T, tb))
        return loss if rows is None else rows.world * loss
    ab = logit_scale * rows.take(a) @ b.T  # (m, B)
    ba = logit_scale * rows.take(b) @ a.T  # (m, B)
    ta = soft_targets(a, logit_scale, label_smoothing, self_distill, rows)
    tb = soft_targets(b, logit_scale, label_smoothing, self_distill, rows)
    per_row = F.cross_entropy(ab, ta, reduction="none") + F.cross_entropy(ba, tb, reduction="none")
    return 0.5 * rows.mean(per_row)


@OBJECTIVES.register("clip")
class InfoNCE(LearnedScale, Objective):
    Config = InfoNCEConfig
    name = "clip"

    def __init__(self, cfg: InfoNCEConfig | None = None, **kwargs: Any):
        super().__init__(cfg, **kwargs)
        self.init_scale(1.0 / self.cfg.init_temperature, self.cfg.max_logit_scale, self.cfg.learn_temperature)

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        a, b = paired(features, batch, *self.cfg.modalities)
        rows = own_rows(batch, self.cfg.modalities, a.shape[0])
        scale = self.scale()
        if self.cfg.tile is not None:
            loss = tiled_info_nce(a, b, scale, self.cfg.tile, rows)
        else:
            loss = soft_info_nce(a, b, scale, self.cfg.label_smoothing, self.cfg.self_distill, rows)
        return {"clip_loss": loss, "logit_scale": scale.detach()}
