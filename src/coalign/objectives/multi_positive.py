"""Multi-positive InfoNCE: every caption of an image is its positive at once (DreamLIP, Zheng et al. 2024).

The image side is (B, E); the text side is a group (B, k, E) with `group_mask` (B, k) marking the
real captions (a `text@all` view made by the bpe transform with `captions: k`). Let C be the real
captions of the batch, pos(i) those of image i, and s_ic = scale * a_i . t_c. Then

    image -> text:  L_i = -log( sum_{c in pos(i)} exp(s_ic) / sum_{c in C} exp(s_ic) )
    text -> image:  L_c = -log( exp(s_{i(c) c}) / sum_j exp(s_jc) )   (one positive image per caption)
    loss = 1/2 ( mean_i L_i + mean_c L_c )

The image -> text term is the "sum inside the log" form, L_in of supervised contrastive learning
(Khosla et al. 2020, eq. 3), without its 1/|pos(i)| inside the log: that factor only adds the
constant log |pos(i)|, which changes no gradient, and leaving it out keeps the minimum at 0. L_in
asks that the image pick out *some* of its captions (probability mass on the set), where L_out
(the mean of -log p_ic over positives) would ask every caption to get an equal share. Images with
no caption are left out of the image -> text mean. With one caption per image both terms are
CLIP's, so the loss equals `info_nce`.

Local loss (several ranks): this rank's images against every caption, and its images' captions
(contiguous among C, as the rows are) against every image; each mean keeps its global count.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from coalign.data.sample import select_present
from coalign.models.model import Features
from coalign.objectives.base import LearnedScale, Objective, TemperatureOptions
from coalign.objectives.distributed import Rows, own_rows
from coalign.registry import OBJECTIVES


class MultiPositiveConfig(TemperatureOptions):
    modalities: tuple[str, str] = ("image", "text@all")  # (single side, group side)


def multi_positive_info_nce(
    a: torch.Tensor,
    t: torch.Tensor,
    mask: torch.Tensor,
    logit_scale: torch.Tensor,
    rows: Rows | None = None,
) -> torch.Tensor:
    """a: (B, E), t: (B, k, E) normalised, mask: (B, k) bool real captions -> the loss above.
    With `rows`, the local loss of those images and their captions."""
    B, k = mask.shape
    captions = t.reshape(B * k, -1)[mask.reshape(-1)]  # (N, E), the real captions only
    owner = torch.arange(B, device=a.device).repeat_interleave(k)[mask.reshape(-1)]  # (N,) image of each
    if rows is not None and rows.count < rows.total:
        return _local(a, captions, owner, mask, logit_scale, rows)
    world = 1 if rows is None else rows.world
    logits = logit_scale * a @ captions.T  # (B, N)
    positive = owner[None, :] == torch.arange(B, device=a.device)[:, None]  # (B, N)
    has = positive.any(dim=1)  # images with at least one caption
    # Only rows with a positive: a row of all -inf would make the logsumexp's backward NaN.
    rows, pos = logits[has], positive[has]
    image_to_text = (rows.logsumexp(dim=1) - rows.masked_fill(~pos, float("-inf")).logsumexp(dim=1)).mean()
    text_to_image = F.cross_entropy(logits.T, owner)
    return 0.5 * world * (image_to_text + text_to_image)


def _local(
    a: torch.Tensor,
    captions: torch.Tensor,
    owner: torch.Tensor,
    mask: torch.Tensor,
    logit_scale: torch.Tensor,
    rows: Rows,
) -> torch.Tensor:
    """The local loss: images rows.start..stop against every caption, their captions against every
    image; the image -> text mean counts the images with a caption, the text -> image one every caption."""
    per_image = mask.sum(dim=1)  # (B,)
    c0, c1 = (int(n) for n in torch.stack([per_image[: rows.start].sum(), per_image[: rows.stop].sum()]))
    mine = rows.index(a.device)
    logits = logit_scale * rows.take(a) @ captions.T  # (m, N): own images, every caption
    positive = owner[None, :] == mine[:, None]  # (m, N)
    has = positive.any(dim=1)
    kept, pos = logits[has], positive[has]
    per_row = kept.logsumexp(dim=1) - kept.masked_fill(~pos, float("-inf")).logsumexp(dim=1)
    image_to_text = rows.mean(per_row, total=int((per_image > 0).sum()))
    back = logit_scale * captions[c0:c1] @ a.T  # (own captions, B): every image
    text_to_image = rows.mean(F.cross_entropy(back, owner[c0:c1], reduction="none"), total=captions.shape[0])
    return 0.5 * (image_to_text + text_to_image)


def paired_group(
    features: dict[str, Features], batch: dict[str, Any], a: str, b: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like `paired`, for a single side a and a group side b: (M, E), (M, k, E), group mask (M, k).

    A plain (B, E) side b is taken as groups of one real item, so the objective also runs on `text`.
    """
    for m in (a, b):
        if m not in features:
            raise KeyError(f"multi_positive needs modality '{m}', but the batch has {sorted(features)}")
    ea, fb = features[a].embedding, features[b]
    if ea.ndim != 2:
        raise ValueError(f"multi_positive: '{a}' must be one item per sample (B, E), got {tuple(ea.shape)}")
    eb = fb.embedding if fb.embedding.ndim == 3 else fb.embedding[:, None]  # (B_b, k, E)
    mask = fb.group_mask
    if mask is None:
        mask = torch.ones(eb.shape[:2], dtype=torch.bool, device=eb.device)
    # the group mask has the rows of b, so it is cut as b is
    ea, eb, mask = select_present(batch, (a, b, b), [ea, eb, mask])
    return ea, eb, mask


@OBJECTIVES.register("multi_positive")
class MultiPositive(LearnedScale, Objective):
    Config = MultiPositiveConfig
    name = "multi_positive"

    def __init__(self, cfg: MultiPositiveConfig | None = None, **kwargs: Any):
        super().__init__(cfg, **kwargs)
        self.init_scale(1.0 / self.cfg.init_temperature, self.cfg.max_logit_scale, self.cfg.learn_temperature)

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        a, t, mask = paired_group(features, batch, *self.cfg.modalities)
        scale = self.scale()
        loss = multi_positive_info_nce(a, t, mask, scale, own_rows(batch, self.cfg.modalities, a.shape[0]))
        return {
            "multi_positive_loss": loss,
            "logit_scale": scale.detach(),
            "captions_per_image": mask.sum(dim=1).float().mean(),  # detached: a count
        }
