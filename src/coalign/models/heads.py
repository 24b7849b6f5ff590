"""Projection heads: pooled encoder features (B, D) -> the shared space (B, E)."""

from __future__ import annotations

from torch import nn

from coalign.registry import HEADS


@HEADS.register("linear")
def linear_head(width: int, embed_dim: int) -> nn.Module:
    return nn.Linear(width, embed_dim, bias=False)


@HEADS.register("mlp")
def mlp_head(width: int, embed_dim: int) -> nn.Module:
    """Two-layer head as in SimCLR / SLIP's image branch."""
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, embed_dim, bias=False))
