"""FILIP: contrastive learning on token-wise late interaction (Yao et al. 2021, arXiv:2111.07783).

Every token of both modalities is projected into the shared space by its modality's projection head
and L2-normalised. The similarity of image i and text j is asymmetric:

    s_i2t[i, j] = mean over image i's tokens k of  max over text j's real tokens r of  <x_ik, y_jr>
    s_t2i[j, i] = mean over text j's real tokens r of  max over image i's tokens k of  <x_ik, y_jr>

and the loss is the mean of the image->text cross-entropy over `scale * s_i2t` (rows: images) and the
text->image cross-entropy over `scale * s_t2i` (rows: texts), each with the diagonal as target.
Padding tokens are never a max and never in a mean. The scores are `models.late_interaction`'s and
the token embeddings `MultimodalModel.project_tokens`', which the evaluator `retrieval_late` uses too,
so training and evaluation score pairs identically.

Local loss (several ranks): this rank's images against every text and its texts against every
image, two (m, N) score blocks instead of one (N, N).
"""

from __future__ import annotations

from typing import Any

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from coalign.models.late_interaction import late_interaction_scores
from coalign.models.model import Features
from coalign.objectives.base import LearnedScale, Objective, TemperatureOptions, paired, paired_tokens
from coalign.objectives.contrastive import info_nce, whole
from coalign.objectives.distributed import Rows, own_rows
from coalign.registry import OBJECTIVES, ConfigError

__all__ = ["FILIP", "FILIPConfig", "filip_loss", "late_interaction_scores"]


class FILIPConfig(TemperatureOptions):
    modalities: tuple[str, str] = ("image", "text")  # (the "image" side, the "text" side)
    # Keep the image tower's prefix (CLS) token among the image tokens. FILIP uses patch tokens only.
    image_cls: bool = False
    # Weight of an extra InfoNCE term on the pooled embeddings (same temperature); 0 = FILIP alone.
    weight_global: float = pydantic.Field(0.0, ge=0)
    # Score at most this many texts at once: bounds the (B, Ni, chunk, Nt) similarity block. None = all.
    text_chunk: int | None = pydantic.Field(None, gt=0)


def filip_loss(
    img_tok: torch.Tensor,
    img_mask: torch.Tensor | None,
    txt_tok: torch.Tensor,
    txt_mask: torch.Tensor | None,
    logit_scale: torch.Tensor,
    text_chunk: int | None = None,
    rows: Rows | None = None,
) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies over in-batch pairs (row i <-> row i);
    with `rows`, the local loss of those rows (see `Rows.mean`)."""
    if whole(rows):
        s_i2t, s_t2i = late_interaction_scores(img_tok, img_mask, txt_tok, txt_mask, text_chunk)
        target = torch.arange(s_i2t.shape[0], device=s_i2t.device)
        loss = 0.5 * (
            F.cross_entropy(logit_scale * s_i2t, target) + F.cross_entropy(logit_scale * s_t2i, target)
        )
        return loss if rows is None else rows.world * loss

    def take(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else rows.take(x)

    s_i2t, _ = late_interaction_scores(take(img_tok), take(img_mask), txt_tok, txt_mask, text_chunk)  # (m, N)
    _, s_t2i = late_interaction_scores(img_tok, img_mask, take(txt_tok), take(txt_mask), text_chunk)  # (m, N)
    target = rows.index(img_tok.device)
    per_row = F.cross_entropy(logit_scale * s_i2t, target, reduction="none")
    per_row = per_row + F.cross_entropy(logit_scale * s_t2i, target, reduction="none")
    return 0.5 * rows.mean(per_row)


@OBJECTIVES.register("filip")
class FILIP(LearnedScale, Objective):
    Config = FILIPConfig
    name = "filip"

    def __init__(self, cfg: FILIPConfig | None = None, **kwargs: Any):
        super().__init__(cfg, **kwargs)
        self.init_scale(1.0 / self.cfg.init_temperature, self.cfg.max_logit_scale, self.cfg.learn_temperature)

    def bind(self, model: nn.Module, transforms: dict[str, Any] | None = None) -> None:
        missing = [m for m in self.cfg.modalities if m not in model.towers]
        if missing:
            raise ConfigError(
                f"filip: modalities {list(self.cfg.modalities)}: the model has no tower for {missing}; "
                f"towers: {', '.join(model.towers)}"
            )
        self.hold_model(model)

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        model = self.model
        a, b = self.cfg.modalities
        for m in (a, b):
            if m not in features:
                raise KeyError(f"objective 'filip' needs modality '{m}'; the batch has {sorted(features)}")
        ta, tb = paired_tokens(features, batch, a, b)
        # FILIP scores content tokens: the image side drops its CLS unless `image_cls`; the text side
        # keeps every token it has.
        xa, ma = model.project_tokens(a, ta, prefix=self.cfg.image_cls)  # (M, Na, E)
        xb, mb = model.project_tokens(b, tb, prefix=True)  # (M, Nb, E)
        scale = self.scale()
        rows = own_rows(batch, (a, b), xa.shape[0])
        local = filip_loss(xa, ma, xb, mb, scale, self.cfg.text_chunk, rows)
        out = {"logit_scale": scale.detach()}
        if self.cfg.weight_global > 0:
            ea, eb = paired(features, batch, a, b)
            glob = info_nce(ea, eb, scale, rows)
            out.update({"local": local.detach(), "global": glob.detach()})
            local = local + self.cfg.weight_global * glob
        out["filip_loss"] = local
        return out
