"""Transformer text encoder over token ids (tiny to CLIP-B scale by configuration)."""

from __future__ import annotations

from typing import Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from coalign.models.encoders.base import (
    Dropout,
    Encoder,
    EncoderConfig,
    MlpRatio,
    Positive,
    Tokens,
    masked_mean,
    used_positions,
)
from coalign.models.layers import Activation, Transformer, init_scaled, padding_attn_mask
from coalign.registry import ENCODERS


class TextConfig(EncoderConfig):
    # a tower may have more token rows and positions than its tokenizer uses, never fewer
    inputs_at_least = ("vocab_size", "context_length")

    vocab_size: Positive | None = None  # taken from the tokenizer when unset
    context_length: Positive | None = None  # likewise
    pad_id: int = pydantic.Field(0, ge=0)
    width: Positive = 512
    depth: Positive = 12
    heads: Positive = 8
    mlp_ratio: MlpRatio = 4.0
    dropout: Dropout = 0.0
    causal: bool = False
    # eos: the last real token, as CLIP. last: the final position of the fixed-length sequence,
    # padding included, and every position attends to all the others (pads too): SigLIP, whose
    # tokenizer pads every caption to context_length, trains so and pools position -1.
    pool: Literal["eos", "mean", "first", "last"] = "eos"
    # A Linear(width, width) with bias on the pooled vector, inside the tower (SigLIP's text `head`;
    # the model's head then passes it through: `model.head: identity`).
    pooled_proj: bool = False
    # A row's real tokens end at its first `eos_id` (inclusive) when set, whatever the ids after it:
    # CLIP's tokenizer pads with id 0, which is also a word ("!"), so padding cannot tell where a
    # caption ends. Unset: the tokens that are not pad_id are the real ones.
    eos_id: int | None = pydantic.Field(None, ge=0)
    act: Activation = "gelu"  # OpenAI CLIP's text towers use quick_gelu
    # Cut a batch to its longest caption before encoding (`trimmed_length`): exact, as padding is
    # never attended to nor pooled. false: always encode context_length positions.
    trim_padding: bool = True
    norm_eps: float = pydantic.Field(1e-5, gt=0.0)

    @classmethod
    def tiny(cls) -> dict:
        return {"width": 32, "depth": 1, "heads": 2}

    @pydantic.field_validator("pad_id")
    @classmethod
    def _pad_is_a_token(cls, pad_id: int, info: pydantic.ValidationInfo) -> int:
        vocab = info.data.get("vocab_size")
        if vocab is not None and pad_id >= vocab:
            raise ValueError(f"pad_id {pad_id} must be a token id below vocab_size {vocab}")
        return pad_id


@ENCODERS.register("text_transformer")
class TextTransformer(Encoder):
    Config = TextConfig
    modality = "text"
    input_ndim = 2

    def valid_items(self, ids: torch.Tensor) -> torch.Tensor:
        if self.cfg.eos_id is not None:
            return (ids == self.cfg.eos_id).any(dim=1)
        return (ids != self.cfg.pad_id).any(dim=1)

    def real_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: the caption's tokens, <eos> included (see `eos_id`)."""
        if self.cfg.eos_id is None:
            return ids != self.cfg.pad_id
        eos = (ids == self.cfg.eos_id).int()
        return (eos.cumsum(1) - eos) == 0  # up to and including the first <eos> (a row without: all)

    def trimmed_length(self, ids: torch.Tensor) -> int | None:
        """The positions up to the last real token of any caption in ids (..., L). Padding after
        it is no key of any real token's attention (bidirectional or causal) and is left out of
        eos/mean/first pooling, so cutting it changes no real token and no pooled vector. `pool:
        last` reads the final padded position, so its input is not cut (`forward` pads a cut one
        back)."""
        if not self.cfg.trim_padding or self.cfg.pool == "last" or ids.shape[-1] == 0:
            return None
        return used_positions(self.real_tokens(ids.reshape(-1, ids.shape[-1])))

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.vocab_size is None or cfg.context_length is None:
            raise ValueError(
                "text_transformer needs vocab_size and context_length (normally from the tokenizer)"
            )
        self.cfg, self.width = cfg, cfg.width
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.context_length, cfg.width) * 0.01)
        self.transformer = Transformer(
            cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.dropout, cfg.act, cfg.norm_eps
        )
        nn.init.normal_(self.token_embed.weight, std=0.02)
        init_scaled(self.transformer)
        if cfg.pooled_proj:
            self.proj = nn.Linear(cfg.width, cfg.width)
            nn.init.normal_(self.proj.weight, std=cfg.width**-0.5)
            nn.init.zeros_(self.proj.bias)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, D) input token embeddings, before positions are added."""
        return self.token_embed(ids)

    def forward(
        self, ids: torch.Tensor, token_embeds: torch.Tensor | None = None, hidden: torch.Tensor | None = None
    ) -> Tokens:
        """ids: (B, L) long, padded with pad_id after the last real token.

        `token_embeds` (B, L, D), when given, replaces `embed(ids)`: prompt learning (CoOp) puts
        learnt vectors where words would be. The padding mask still comes from `ids`, so a learnt
        position must carry a non-pad id.

        `hidden` (B, L) bool, when given, takes tokens out as padding is taken out (M3AE's text
        masking): no token attends to them and the returned mask marks them False, which is what
        removing them would give, while the batch stays rectangular (rows hide different counts)."""
        cut = ids.shape[1] < self.cfg.context_length and token_embeds is None and hidden is None
        if self.cfg.pool == "last" and cut:
            # ids cut for another tower reading the same batch (a distillation teacher's): the
            # padding comes back, so position -1 is the one this tower was trained to pool
            ids = F.pad(ids, (0, self.cfg.context_length - ids.shape[1]), value=self.cfg.pad_id)
        valid = self.real_tokens(ids)  # (B, L)
        if hidden is not None:
            valid = valid & ~hidden
        if token_embeds is None:
            token_embeds = self.embed(ids)
        elif token_embeds.shape != (*ids.shape, self.width):
            raise ValueError(
                f"token_embeds must be (B, L, D) = {(*ids.shape, self.width)} to match ids, "
                f"got {tuple(token_embeds.shape)}"
            )
        x = token_embeds + self.pos_embed[:, : ids.shape[1]]
        if self.cfg.pool == "last":  # the whole padded sequence is the input (see `pool`)
            every = torch.ones_like(valid)
            x = self.transformer(x, padding_attn_mask(every, True) if self.cfg.causal else None)
        else:
            x = self.transformer(x, padding_attn_mask(valid, self.cfg.causal))
        return Tokens(x, valid)

    def pool(self, out: Tokens) -> torch.Tensor:
        pooled = self._pooled(out)  # (B, D)
        return self.proj(pooled) if self.cfg.pooled_proj else pooled

    def _pooled(self, out: Tokens) -> torch.Tensor:
        if self.cfg.pool == "mean":
            return masked_mean(out.tokens, out.mask)
        if self.cfg.pool == "first":
            return out.tokens[:, 0]
        if self.cfg.pool == "last":
            return out.tokens[:, -1]
        last = out.mask.long().sum(1).clamp_min(1) - 1  # (B,) index of the last real token
        return out.tokens[torch.arange(out.tokens.shape[0], device=last.device), last]

    @classmethod
    def example_input(cls, cfg: TextConfig, batch: int = 2) -> torch.Tensor:
        ids = torch.randint(3, cfg.vocab_size, (batch, cfg.context_length))
        ids[0, cfg.context_length // 2 :] = cfg.pad_id  # one padded row
        return ids
