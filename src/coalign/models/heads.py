"""Projection heads: pooled encoder features (B, D) -> the shared space (B, E)."""

from __future__ import annotations

from torch import nn

from coalign.registry import HEADS


@HEADS.register("linear")
def linear_head(width: int, embed_dim: int) -> nn.Module:
    # CLIP's projection std, width**-0.5 (torch's default for a Linear is 1/sqrt(3 width), ~0.58x)
    head = nn.Linear(width, embed_dim, bias=False)
    nn.init.normal_(head.weight, std=width**-0.5)
    return head


@HEADS.register("mlp")
def mlp_head(width: int, embed_dim: int) -> nn.Module:
    """Two-layer head as in SimCLR / SLIP's image branch."""
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, embed_dim, bias=False))
