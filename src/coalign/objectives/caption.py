"""Captioning: CoCa's generative loss beside its contrastive one (Yu et al. 2022, arXiv:2205.01917).

The model's caption decoder (`model.decoder`, models/decoder.py) reads the text tower's tokens of
each caption, which the model has already computed for the contrastive loss (the tower is causal,
so one pass serves both, as in CoCa), and the image tower's tokens. Position t predicts token t + 1
(teacher forcing). The loss is the mean cross-entropy over every predicted token that is a real
token of the caption (its words and its `<eos>`, which teaches the decoder where to stop); padding
is ignored, wherever it sits and whatever its id (the tower's padding mask decides, not the pad id:
CLIP's tokenizer pads with a word's id).

CoCa weighs captioning 2 : 1 against the contrastive loss; the recipe's objective `weight`s say it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from coalign.data.sample import present_rows
from coalign.models.decoder import valid_of
from coalign.models.model import Features
from coalign.objectives.base import Objective, ObjectiveConfig, paired_tokens
from coalign.objectives.distributed import own_rows
from coalign.registry import OBJECTIVES, ConfigError


class CaptionConfig(ObjectiveConfig):
    batch_key_fields: ClassVar[tuple[str, ...]] = ("image", "text")
    needs_decoder: ClassVar[bool] = True  # the recipe loader then requires a model.decoder

    image: str = "image"  # the batch key of the images (the decoder's context tower)
    text: str = "text"  # the batch key of the captions (the decoder's text tower)
    label_smoothing: float = pydantic.Field(0.0, ge=0.0, lt=1.0)  # F.cross_entropy's


def caption_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    valid: torch.Tensor,
    label_smoothing: float = 0.0,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy): the mean cross-entropy of the next-token predictions over real targets.

    logits (M, L, V): position t predicts ids[:, t + 1]; ids (M, L); valid (M, L) bool, the caption's
    real tokens. Only the (n, V) rows that predict a real token go through the loss: padding costs
    nothing, and a batch without any target gives 0 (still attached to the graph). `scale` (default
    1 / n) multiplies the sums (`Rows.per_item` under several ranks)."""
    keep = valid[:, 1:]  # (M, L - 1): the targets that are real tokens
    pred = logits[:, :-1][keep].float()  # (n, V)
    target = ids[:, 1:][keep]  # (n,)
    scale = 1.0 / max(target.shape[0], 1) if scale is None else scale
    loss = F.cross_entropy(pred, target, reduction="sum", label_smoothing=label_smoothing) * scale
    accuracy = (pred.argmax(-1) == target).float().sum() * scale
    return loss, accuracy.detach()


@OBJECTIVES.register("caption")
class Caption(Objective):
    Config = CaptionConfig
    name = "caption"
    needs_inputs = True  # reads the caption ids (the targets) beside the features

    def bind(self, model: nn.Module, transforms: dict[str, Any] | None = None) -> None:
        decoder = getattr(model, "decoder", None)
        if decoder is None:
            raise ConfigError("caption: the model has no caption decoder; add one under model.decoder")
        got = (self.cfg.text.split("@", 1)[0], self.cfg.image.split("@", 1)[0])
        if got != (decoder.text, decoder.context):
            raise ConfigError(
                f"caption: text '{self.cfg.text}' and image '{self.cfg.image}' are not the towers the "
                f"decoder reads (text {decoder.text}, context {decoder.context})"
            )
        self.hold_model(model)

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        text, image = self.cfg.text, self.cfg.image
        ids = batch.get(text)
        if isinstance(ids, torch.Tensor) and ids.ndim != 2:
            raise ValueError(
                f"caption trains on single captions (M, L); '{text}' holds {tuple(ids.shape)} "
                "(use captions: 1)"
            )
        tt, ti = paired_tokens(features, batch, text, image)  # (M, L, Dt), (M, Ni, Di)
        rows = present_rows(batch, (text, image))[0]
        ids = ids if rows is None else ids[rows.to(ids.device)]  # (M, L)
        if ids.shape[0] == 0:
            zero = sum(p.sum() for p in self.model.decoder.parameters()) * 0.0  # keeps the graph whole
            return {"caption_loss": zero, "accuracy": zero.detach()}
        # under several ranks each decodes its own captions of the gathered batch (local loss)
        own = own_rows(batch, (text, image), ids.shape[0])
        tt, ti, ids = own.pick_tokens(tt), own.pick_tokens(ti), own.pick(ids)
        logits = self.model.decoder(tt, ti)  # (m, L, V)
        valid = valid_of(tt)
        scale = own.per_item(valid[:, 1:].sum())  # over the real targets of every rank
        loss, accuracy = caption_loss(logits, ids.to(logits.device), valid, self.cfg.label_smoothing, scale)
        return {"caption_loss": loss, "accuracy": accuracy}
