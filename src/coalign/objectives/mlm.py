"""Masked language modelling conditioned on the image (UNITER's conditional masking, Chen et al.
2020, arXiv:1909.11740; BERT's 15 % with 80/10/10, Devlin et al. 2019).

Of the caption's word tokens (never `<pad>`, `<bos>`, `<eos>`: the text transform's `special_ids`),
each is chosen with probability `mask_prob`. A chosen token is replaced by a learnt mask vector with
probability 0.8, by a random word token with 0.1, and left as it is with 0.1. The masked caption goes
through the text tower again, is fused with the *unmasked* image tokens (only one side is masked at a
time, so the image can tell what is hidden), and a head predicts the original ids of the chosen
positions over the tokenizer's vocabulary. Loss: the mean cross-entropy over chosen positions.

Why the objective masks and not the transform: the batch already holds the caption ids, and the
labels are those ids, so masking here needs no second view, no label tensor threaded through
collate and no new key the loader must know; the draw uses torch's global RNG, which the run
checkpoints, so resume masks the same tokens. Why a learnt vector and not a `[MASK]` token id: the
byte-level BPE has no such token, and adding one would shift or break the tokenizers of existing
runs; the text tower already takes input embeddings in place of ids (`token_embeds`, as for
prompt learning), and the padding mask still comes from the ids, which keep their original values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from coalign.data.sample import present_rows
from coalign.models.ema import EMA
from coalign.models.model import Features, MultimodalModel
from coalign.objectives.base import FusedObjective, FusedOptions, paired_tokens
from coalign.objectives.distributed import Rows, own_rows
from coalign.objectives.momentum import (
    MomentumOptions,
    clear_momentum_cache,
    momentum_features,
    momentum_model,
    soft_kl,
)
from coalign.registry import OBJECTIVES, ConfigError

IGNORE = -100  # the label of a position that is not predicted (F.cross_entropy's ignore_index)


class MLMConfig(FusedOptions, MomentumOptions):
    masked: str = "text"  # the modality whose ids are masked: the fusion part's query tower
    # ALBEF's momentum distillation: loss = (1 - alpha) CE + alpha KL(momentum model's prediction ||
    # the model's), per chosen position; 0: no momentum model. `momentum`: its EMA decay.
    alpha: float = pydantic.Field(0.0, ge=0.0, lt=1.0)
    mask_prob: float = pydantic.Field(0.15, gt=0, lt=1)  # chance that a word token is chosen
    mask_token: float = pydantic.Field(0.8, ge=0, le=1)  # of the chosen: replaced by the mask vector
    random_token: float = pydantic.Field(0.1, ge=0, le=1)  # of the chosen: replaced by a random word

    @classmethod
    def tiny(cls) -> dict:
        return {"mask_prob": 0.3}  # the tiny batch has few words; 15 % of them might be none

    @pydantic.model_validator(mode="after")
    def _fractions(self):
        if self.masked not in self.modalities:
            raise ValueError(f"masked '{self.masked}' must be one of modalities {list(self.modalities)}")
        if self.mask_token + self.random_token > 1:
            raise ValueError(
                f"mask_token + random_token must be at most 1 (the rest stays unchanged), got "
                f"{self.mask_token} + {self.random_token}"
            )
        return self


@dataclass
class Masked:
    ids: torch.Tensor  # (M, L) the input ids: originals, with the random replacements
    use_mask: torch.Tensor  # (M, L) bool: positions whose input is the mask vector
    labels: torch.Tensor  # (M, L) the original id at chosen positions, IGNORE elsewhere


def mask_tokens(
    ids: torch.Tensor,
    words: torch.Tensor,
    prob: float = 0.15,
    mask_token: float = 0.8,
    random_token: float = 0.1,
    generator: torch.Generator | None = None,
) -> Masked:
    """BERT's masking of (M, L) ids. `words` (V,) bool marks the ids that may be chosen and drawn as
    random replacements (the vocabulary without its special tokens)."""
    V = words.shape[0]
    eligible = words[ids.clamp(0, V - 1)] & (ids < V)  # (M, L)
    chosen = (torch.rand(ids.shape, generator=generator, device=ids.device) < prob) & eligible
    r = torch.rand(ids.shape, generator=generator, device=ids.device)
    use_mask = chosen & (r < mask_token)
    use_random = chosen & (r >= mask_token) & (r < mask_token + random_token)
    candidates = words.nonzero().squeeze(1)  # (W,) word ids
    pick = torch.randint(candidates.shape[0], ids.shape, generator=generator, device=ids.device)
    replaced = torch.where(use_random, candidates[pick], ids)
    return Masked(replaced, use_mask, torch.where(chosen, ids, torch.full_like(ids, IGNORE)))


def mlm_logits(head: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, blocked: torch.Tensor):
    """(n, V) float logits of the n positions with a label (blocked ids: -inf). Only the chosen
    positions go through the head: (n, V), not (M, L, V)."""
    return head(tokens[labels != IGNORE]).float().masked_fill(blocked, float("-inf"))


def mlm_loss(
    head: nn.Module,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    blocked: torch.Tensor,
    soft: torch.Tensor | None = None,
    alpha: float = 0.0,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy) over the positions with a label. tokens (M, L, D) fused query tokens; labels
    (M, L); blocked (V,) bool: ids never predicted (their logits are -inf). Without `soft`: the mean
    cross-entropy. With `soft` (n, V), the momentum model's probabilities at the chosen positions:
    (1 - alpha) mean CE + alpha mean KL(soft || prediction) (ALBEF's momentum distillation).

    `scale` (default 1 / the number of chosen positions) multiplies the sums: under several ranks
    `Rows.per_item`, which makes the value this rank's share of the mean over every rank's positions."""
    logits = mlm_logits(head, tokens, labels, blocked)  # (n, V)
    target = labels[labels != IGNORE]  # (n,)
    # no chosen position (a batch of one-word captions): 0, still attached to the graph
    scale = 1.0 / max(target.shape[0], 1) if scale is None else scale
    loss = F.cross_entropy(logits, target, reduction="sum") * scale
    if soft is not None:
        loss = (1 - alpha) * loss + alpha * soft_kl(logits, soft).sum() * scale
    accuracy = (logits.argmax(-1) == target).float().sum() * scale
    return loss, accuracy.detach()


@OBJECTIVES.register("mlm")
class MLM(FusedObjective):
    Config = MLMConfig
    name = "mlm"
    needs_inputs = True  # masks the batch's caption ids and encodes them again

    def __init__(self, cfg: MLMConfig | None = None, **kwargs: Any):
        super().__init__(cfg, **kwargs)
        self.head: nn.Module | None = None
        self.mask_vector: nn.Parameter | None = None
        self.generator: torch.Generator | None = None  # None: torch's global RNG
        self.owns_momentum = False

    def bind(self, model: nn.Module, transforms: dict[str, Any] | None = None) -> None:
        super().bind(model, transforms)
        text = self.cfg.masked
        if model.fusion.query != text:
            raise ConfigError(
                f"mlm: masked '{text}' must be the fusion part's query tower (model.fusion.query is "
                f"'{model.fusion.query}'): its predictions are read from the query's fused tokens"
            )
        tower = model.towers[text]
        if not hasattr(tower, "embed"):
            raise ConfigError(f"mlm: the '{text}' tower takes no input embeddings (embed + token_embeds)")
        transform = (transforms or {}).get(text)
        vocab = (transform.describe() if transform is not None else {}).get("vocab_size")
        vocab = vocab or tower.cfg.vocab_size
        specials = transform.special_ids() if hasattr(transform, "special_ids") else [tower.cfg.pad_id]
        words = torch.ones(vocab, dtype=torch.bool)
        words[[s for s in specials if s < vocab]] = False
        # not persistent: derived from the tokenizer, which the run saves itself
        self.register_buffer("words", words, persistent=False)
        self.mask_vector = nn.Parameter(torch.randn(tower.width) * 0.02)  # as the token embeddings start
        D = model.fusion.width
        # BERT's prediction head: transform, then a decoder over the vocabulary
        self.head = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D), nn.Linear(D, vocab))

        if self.cfg.alpha > 0:
            momentum_model(self, model, self.cfg.momentum)
            self.head_momentum = EMA(self._own_parts(), self.cfg.momentum)  # its head and mask vector

    def _own_parts(self) -> nn.Module:
        """The MLM's own trained parts under stable names (what `head_momentum` follows)."""
        parts = nn.Module()
        parts.head, parts.mask_vector = self.head, self.mask_vector
        return parts

    def after_step(self, step: int) -> None:
        """After each optimizer step: the momentum copies move towards the new weights."""
        if self.cfg.alpha == 0:
            return
        self.head_momentum.update(self._own_parts())
        if self.owns_momentum:
            self.momentum.update(self.model)
            clear_momentum_cache(self.momentum)

    @property
    def pair(self) -> tuple[str, str]:
        """(the masked tower, the other one)."""
        return self.cfg.masked, next(m for m in self.cfg.modalities if m != self.cfg.masked)

    def masking(self, batch: dict[str, Any]) -> Masked:
        """The masking of the batch's M captions (all of them: every rank draws the same numbers a
        single process would)."""
        text, other = self.pair
        rows = dict(zip((text, other), present_rows(batch, (text, other)), strict=True))[text]
        ids = batch[text]
        if ids.ndim != 2:
            raise ValueError(
                f"mlm masks single captions (M, L); '{text}' holds {tuple(ids.shape)} (use captions: 1)"
            )
        ids = ids if rows is None else ids[rows.to(ids.device)]  # (M, L)
        return mask_tokens(
            ids,
            self.words.to(ids.device),
            self.cfg.mask_prob,
            self.cfg.mask_token,
            self.cfg.random_token,
            self.generator,
        )

    def fused_masked(
        self,
        model: MultimodalModel,
        mask_vector: torch.Tensor,
        masked: Masked,
        features: dict[str, Features],
        batch: dict[str, Any],
        own: Rows,
    ) -> torch.Tensor:
        """Fused query tokens (m, L, D) of the `own` rows' masked captions (`masked` holds just those)
        with their unmasked image, through `model` (the model itself, or its momentum copy with its
        own mask vector)."""
        text, other = self.pair
        embeds = model.towers[text].embed(masked.ids)  # (M, L, D_text)
        embeds = torch.where(masked.use_mask[..., None], mask_vector.to(embeds.dtype), embeds)
        query = model.features(text, masked.ids, token_embeds=embeds).tokens
        _, context = paired_tokens(features, batch, text, other)  # the unmasked image tokens
        context = own.pick_tokens(context)
        fused = model.fuse({text: query, other: context})
        return fused.tokens[:, : masked.ids.shape[1]]  # the query's rows

    def predict(
        self, features: dict[str, Features], batch: dict[str, Any]
    ) -> tuple[torch.Tensor, Masked, Rows]:
        """Fused query tokens (m, L, D) of this rank's masked captions with their image, their
        masking, and which of the batch's M captions they are (all M in one process)."""
        whole = self.masking(batch)
        own = own_rows(batch, self.pair, whole.ids.shape[0])
        masked = Masked(own.pick(whole.ids), own.pick(whole.use_mask), own.pick(whole.labels))
        return self.fused_masked(self.model, self.mask_vector, masked, features, batch, own), masked, own

    @torch.no_grad()
    def momentum_targets(self, masked: Masked, batch: dict[str, Any], own: Rows) -> torch.Tensor:
        """(n, V) the momentum model's probabilities at the chosen positions (the same masking)."""
        keys = tuple(self.cfg.modalities)
        shadow, parts = self.momentum.shadow, self.head_momentum.shadow
        features = momentum_features(self.momentum, batch, keys)
        tokens = self.fused_masked(shadow, parts.mask_vector, masked, features, batch, own)
        return torch.softmax(mlm_logits(parts.head, tokens, masked.labels, ~self.words), dim=-1)

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        tokens, masked, own = self.predict(features, batch)
        soft = self.momentum_targets(masked, batch, own) if self.cfg.alpha > 0 else None
        picked = masked.labels != IGNORE
        scale = own.per_item(picked.sum())  # over the chosen positions of every rank
        loss, accuracy = mlm_loss(self.head, tokens, masked.labels, ~self.words, soft, self.cfg.alpha, scale)
        chosen = own.share(picked.float().mean())  # the fraction of positions chosen
        return {"mlm_loss": loss, "accuracy": accuracy, "chosen": chosen.detach()}
