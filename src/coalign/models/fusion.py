"""Fusion parts: transformer layers that mix the tokens of two towers (ALBEF, BLIP, UNITER).

A fusion part reads the token features of a *query* tower and a *context* tower (each `Tokens`:
(B, N, D_tower) plus a padding mask) and returns fused tokens `Tokens((B, N, D), mask)` whose first
`N_query` rows are the query's tokens, in order. Row 0 is the query's first token (the text tower's
`<bos>`), the fused [CLS] that an ITM head reads; MLM reads rows 1..N_query - 1.

- `cross` (ALBEF, BLIP): per layer, self-attention over the query tokens, cross-attention from the
  query to the context tokens, an MLP. The output has the query's N and mask.
- `single` (UNITER): the two sequences, each plus a learnt type embedding, concatenated and run
  through one transformer. The output is (B, N_query + N_context, D) with both masks concatenated.

Each side is projected from its tower's width to the fusion width first (towers rarely share one).
Every part carries the image-text matching head (`match_head`, read by the `itm` objective and
by re-ranking). Padding is honoured on both sides: a padded key is never attended to (the SDPA
mask), so neither the values of padded tokens nor the amount of padding change the fused real tokens.
"""

from __future__ import annotations

import pydantic
import torch
import torch.utils.checkpoint
from torch import nn

from coalign.models.encoders.base import Dropout, EncoderConfig, MlpRatio, Positive, Tokens
from coalign.models.layers import MLP, Attention, Transformer, attention, init_weights, padding_attn_mask
from coalign.registry import FUSION


class FusionConfig(EncoderConfig):
    """Shared by every fusion part (EncoderConfig for its heads-divide-width check)."""

    query: str = "text"  # the tower whose tokens come out first (row 0: the fused [CLS])
    context: str = "image"  # the tower they attend to (cross) or are concatenated with (single)
    width: Positive = 256
    depth: Positive = 2
    heads: Positive = 4
    mlp_ratio: MlpRatio = 4.0
    dropout: Dropout = 0.0

    @classmethod
    def tiny(cls) -> dict:
        return {"width": 32, "depth": 1, "heads": 2}

    @pydantic.model_validator(mode="after")
    def _two_towers(self):
        if self.query == self.context:
            raise ValueError(f"query and context must be two different towers, got '{self.query}' twice")
        return self

    def towers(self) -> dict[str, str]:
        """field -> the tower it names (the recipe loader checks that the model has each)."""
        return {"query": self.query, "context": self.context}


def _valid(tokens: Tokens) -> torch.Tensor:
    """(B, N) bool: True for real tokens (a tower without a mask has only real ones)."""
    t = tokens.tokens
    return (
        tokens.mask if tokens.mask is not None else torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
    )


class Fusion(nn.Module):
    Config = FusionConfig
    both_streams = False  # the output holds the context's fused tokens too (rows N_query onwards)

    def __init__(self, cfg: FusionConfig, widths: dict[str, int]):
        """`widths`: tower name -> token width D of that tower (at least the query and the context)."""
        super().__init__()
        missing = [m for m in (cfg.query, cfg.context) if m not in widths]
        if missing:
            raise ValueError(f"fusion needs towers {missing}; the model has {sorted(widths)}")
        self.cfg, self.width = cfg, cfg.width
        self.query, self.context = cfg.query, cfg.context
        self.proj_query = nn.Linear(widths[cfg.query], cfg.width)
        self.proj_context = nn.Linear(widths[cfg.context], cfg.width)
        # The image-text matching head on the fused [CLS]: logits of (mismatch, match). Part of the
        # fusion part, not of the `itm` objective, so that a loaded run can score pairs (re-ranking).
        self.match_head = nn.Linear(cfg.width, 2)

    def forward(self, query: Tokens, context: Tokens) -> Tokens:
        raise NotImplementedError

    @staticmethod
    def cls(fused: Tokens) -> torch.Tensor:
        """(B, D) the fused [CLS]: row 0, the query's first token."""
        return fused.tokens[:, 0]

    def context_tokens(self, context: Tokens) -> Tokens:
        """(B, Nc, D) the context's tokens as the fusion layers read them (for `both_streams` parts
        the fused output holds them instead)."""
        return Tokens(self.proj_context(context.tokens), context.mask)

    def match_logits(self, fused: Tokens) -> torch.Tensor:
        """(B, 2) float ITM logits (mismatch, match) of fused pairs."""
        return self.match_head(self.cls(fused)).float()

    def match_score(self, fused: Tokens) -> torch.Tensor:
        """(B,) the probability that each fused pair matches (ALBEF's re-ranking score)."""
        return torch.softmax(self.match_logits(fused), dim=-1)[:, 1]


class CrossAttention(nn.Module):
    """Queries from x (B, Nq, D), keys and values from the context (B, Nc, D)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, Nq, D = x.shape
        Nc, h = ctx.shape[1], self.heads
        q = self.q(x).view(B, Nq, h, D // h).transpose(1, 2)  # (B, h, Nq, d)
        k, v = self.kv(ctx).view(B, Nc, 2, h, D // h).permute(2, 0, 3, 1, 4)  # (B, h, Nc, d) each
        y = attention(q, k, v, attn_mask, self.dropout if self.training else 0.0)  # (B, h, Nq, d)
        return self.proj(y.transpose(1, 2).reshape(B, Nq, D))


class CrossBlock(nn.Module):
    """Pre-norm: self-attention over the query, cross-attention to the context, MLP (BERT + ALBEF)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(
        self, x: torch.Tensor, self_mask: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), self_mask)
        x = x + self.cross(self.norm_cross(x), ctx, ctx_mask)
        return x + self.mlp(self.norm2(x))


@FUSION.register("cross")
class CrossFusion(Fusion):
    def __init__(self, cfg: FusionConfig, widths: dict[str, int]):
        super().__init__(cfg, widths)
        self.norm_context = nn.LayerNorm(cfg.width)
        self.blocks = nn.ModuleList(
            CrossBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.width)
        init_weights(self)

    def context_tokens(self, context: Tokens) -> Tokens:
        return Tokens(self.norm_context(self.proj_context(context.tokens)), context.mask)

    def forward(self, query: Tokens, context: Tokens) -> Tokens:
        q_valid, c_valid = _valid(query), _valid(context)  # (B, Nq), (B, Nc)
        x = self.proj_query(query.tokens)  # (B, Nq, D)
        ctx = self.norm_context(self.proj_context(context.tokens))  # (B, Nc, D)
        self_mask = padding_attn_mask(q_valid)  # (B, 1, 1, Nq): no query attends to a padded query
        ctx_mask = c_valid[:, None, None, :]  # (B, 1, 1, Nc): nor to a padded context token
        for block in self.blocks:
            if self.cfg.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, self_mask, ctx, ctx_mask, use_reentrant=False)
            else:
                x = block(x, self_mask, ctx, ctx_mask)
        return Tokens(self.norm(x), query.mask)


@FUSION.register("single")
class SingleStreamFusion(Fusion):
    both_streams = True

    def __init__(self, cfg: FusionConfig, widths: dict[str, int]):
        super().__init__(cfg, widths)
        # Which stream a token came from: each tower adds its own positions, but nothing else tells
        # the shared layers where text ends and image begins (UNITER's modality embedding).
        self.type_embed = nn.Parameter(torch.zeros(2, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.dropout)
        self.transformer.grad_checkpointing = cfg.grad_checkpointing
        init_weights(self)
        nn.init.normal_(self.type_embed, std=0.02)

    def forward(self, query: Tokens, context: Tokens) -> Tokens:
        x = torch.cat(
            [
                self.proj_query(query.tokens) + self.type_embed[0],
                self.proj_context(context.tokens) + self.type_embed[1],
            ],
            dim=1,
        )  # (B, Nq + Nc, D)
        valid = torch.cat([_valid(query), _valid(context)], dim=1)  # (B, Nq + Nc)
        return Tokens(self.transformer(x, padding_attn_mask(valid)), valid)


@torch.no_grad()
def match_scores(
    fusion: Fusion,
    query: Tokens,
    context: Tokens,
    query_rows: torch.Tensor,
    context_rows: torch.Tensor,
    chunk: int = 256,
) -> torch.Tensor:
    """(P,) ITM match probabilities of the P pairs (query row query_rows[p], context row
    context_rows[p]). `query` and `context` are the towers' token features of all candidates, on any
    device; pairs are fused `chunk` at a time on the fusion part's device (memory: one chunk)."""
    device = next(fusion.parameters()).device

    def rows(t: Tokens, idx: torch.Tensor) -> Tokens:
        mask = None if t.mask is None else t.mask[idx].to(device)
        return Tokens(t.tokens[idx].to(device), mask)

    out = [
        fusion.match_score(
            fusion(rows(query, query_rows[i : i + chunk]), rows(context, context_rows[i : i + chunk]))
        ).cpu()
        for i in range(0, len(query_rows), chunk)
    ]
    return torch.cat(out) if out else torch.zeros(0)
