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


@HEADS.register("identity")
def identity_head(width: int, embed_dim: int) -> nn.Module:
    """No projection: the pooled vector is the embedding (SigLIP, whose towers end in their own heads:
    the ViT's attention pooling, the text tower's `pooled_proj`). Needs width == embed_dim."""
    if width != embed_dim:
        raise ValueError(
            f"model.head 'identity' passes pooled features through unchanged, so model.embed_dim "
            f"({embed_dim}) must equal every tower's width; a tower has width {width}"
        )
    return nn.Identity()


identity_head.square = True  # built only with width == embed_dim (the registry's tests read this)
