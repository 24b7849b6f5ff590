"""Caption decoders: the multimodal half of CoCa's text decoder (Yu et al. 2022, arXiv:2205.01917).

CoCa splits one causal text decoder in two. The *unimodal* half is the model's text tower, built
causal (`causal: true`): each token sees only the tokens before it, and the last real token (its
`<eos>`, `pool: eos`) gives the contrastive text embedding, so the text tower stays a plain dual
encoder for evaluation, search and serving. The *multimodal* half, here, reads the unimodal
tokens and the image tower's tokens and predicts each next token:

    image tokens (B, Ni, Di) --attentional pooler--> (B, n_queries, D)   learnt queries attend to them
    text tokens (B, L, Dt) -> Linear -> [causal self-attention, cross-attention to the pooled
    image tokens, MLP] x depth -> LayerNorm -> Linear -> logits (B, L, vocab)

Position t's logits predict token t + 1: the self-attention is causal and the text tower is causal,
so nothing a position reads lies after it, and one pass over a caption trains every position
(teacher forcing), as one pass generates the next token of a prefix. Padding is honoured on both
sides: a padded text token is never attended to, and a padded image token (a masked or padded
context) never reaches the pooler.

The decoder is a part of the model (`model.decoder` in a recipe), not of the captioning objective:
a loaded run generates captions with it (`coalign caption`, `POST /caption`). Its vocabulary size is
taken from the text transform, as the text tower's is.
"""

from __future__ import annotations

import pydantic
import torch
import torch.utils.checkpoint
from torch import nn

from coalign.models.encoders.base import Dropout, EncoderConfig, MlpRatio, Positive, Tokens
from coalign.models.fusion import CrossAttention, CrossBlock
from coalign.models.layers import init_weights, padding_attn_mask
from coalign.registry import DECODERS


class DecoderConfig(EncoderConfig):
    """The CoCa decoder's options (EncoderConfig for its heads-divide-width check)."""

    inputs_at_least = ("vocab_size",)  # a head over more ids than the tokenizer has is harmless

    text: str = "text"  # the (causal) text tower whose tokens it continues
    context: str = "image"  # the tower whose tokens it attends to, through the attentional pooler
    vocab_size: Positive | None = None  # taken from the text transform when unset
    width: Positive = 256
    depth: Positive = 2
    heads: Positive = 4
    mlp_ratio: MlpRatio = 4.0
    dropout: Dropout = 0.0
    # learnt queries of the attentional pooler: the image summary the decoder attends to
    # (CoCa: 256 for captioning; a small image's tower has few tokens, so fewer do)
    n_queries: Positive = 32

    @classmethod
    def tiny(cls) -> dict:
        return {"width": 32, "depth": 1, "heads": 2, "n_queries": 4}

    @pydantic.model_validator(mode="after")
    def _two_towers(self):
        if self.text == self.context:
            raise ValueError(f"text and context must be two different towers, got '{self.text}' twice")
        return self

    def towers(self) -> dict[str, str]:
        """field -> the tower it names (the recipe loader checks that the model has each)."""
        return {"text": self.text, "context": self.context}


def valid_of(tokens: Tokens) -> torch.Tensor:
    """(B, N) bool: True for real tokens (a tower without a mask has only real ones)."""
    t = tokens.tokens
    if tokens.mask is not None:
        return tokens.mask
    return torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)


class AttentionalPooler(nn.Module):
    """n learnt queries attend to the context tokens (CoCa's, after Set Transformer's PMA):
    (B, Nc, Dc) tokens with their padding mask -> (B, n, D), whatever Nc is."""

    def __init__(self, width: int, context_width: int, n_queries: int, heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, width) * 0.02)
        self.proj = nn.Linear(context_width, width)
        self.norm_context = nn.LayerNorm(width)
        self.attn = CrossAttention(width, heads)
        self.norm = nn.LayerNorm(width)

    def forward(self, context: Tokens) -> torch.Tensor:
        ctx = self.norm_context(self.proj(context.tokens))  # (B, Nc, D)
        q = self.queries.to(ctx.dtype).expand(ctx.shape[0], -1, -1)  # (B, n, D)
        mask = valid_of(context)[:, None, None, :]  # (B, 1, 1, Nc): no query reads a padded token
        return self.norm(self.attn(q, ctx, mask))


class Decoder(nn.Module):
    """The contract of a caption decoder: `pool_context(context) -> memory`, then
    `logits(text_tokens, memory) -> (B, L, vocab)`; `forward` does both."""

    Config = DecoderConfig

    def __init__(self, cfg: DecoderConfig, widths: dict[str, int]):
        super().__init__()
        missing = [m for m in (cfg.text, cfg.context) if m not in widths]
        if missing:
            raise ValueError(f"the decoder needs towers {missing}; the model has {sorted(widths)}")
        if cfg.vocab_size is None:
            raise ValueError("the decoder needs vocab_size (normally from the text transform)")
        self.cfg, self.width, self.vocab_size = cfg, cfg.width, cfg.vocab_size
        self.text, self.context = cfg.text, cfg.context

    def pool_context(self, context: Tokens) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, text: Tokens, memory: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, text: Tokens, context: Tokens) -> torch.Tensor:
        """(B, L, vocab) float next-token logits of the text tokens (B, L, Dt) given the context."""
        return self.logits(text, self.pool_context(context))


@DECODERS.register("coca")
class CoCaDecoder(Decoder):
    def __init__(self, cfg: DecoderConfig, widths: dict[str, int]):
        super().__init__(cfg, widths)
        self.pooler = AttentionalPooler(cfg.width, widths[cfg.context], cfg.n_queries, cfg.heads)
        self.proj_text = nn.Linear(widths[cfg.text], cfg.width)
        self.blocks = nn.ModuleList(
            CrossBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab_size)
        init_weights(self)
        nn.init.normal_(self.pooler.queries, std=0.02)

    def pool_context(self, context: Tokens) -> torch.Tensor:
        """(B, n_queries, D): computed once per image, however many tokens are generated after."""
        return self.pooler(context)

    def logits(self, text: Tokens, memory: torch.Tensor) -> torch.Tensor:
        x = self.proj_text(text.tokens)  # (B, L, D)
        self_mask = padding_attn_mask(valid_of(text), causal=True)  # (B, 1, L, L)
        for block in self.blocks:
            if self.cfg.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, self_mask, memory, None, use_reentrant=False)
            else:
                x = block(x, self_mask, memory, None)
        return self.head(self.norm(x)).float()
