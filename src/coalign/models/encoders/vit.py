"""Vision Transformer image encoder (tiny to ViT-B/16 by configuration)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from coalign.models.encoders.base import Encoder, Tokens
from coalign.models.layers import Transformer, init_weights
from coalign.registry import ENCODERS, StrictModel


class ViTConfig(StrictModel):
    image_size: int | None = None  # taken from the image transform when unset
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    pool: Literal["cls", "mean"] = "cls"

    @classmethod
    def smoke_options(cls) -> dict:
        return {"width": 32, "depth": 1, "heads": 2}


@ENCODERS.register("vit")
class ViT(Encoder):
    Config = ViTConfig

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        size = cfg.image_size or 224
        if size % cfg.patch_size:
            raise ValueError(f"image_size {size} must be divisible by patch_size {cfg.patch_size}")
        self.cfg, self.width = cfg, cfg.width
        self.grid = size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.grid**2, cfg.width) * 0.02)
        self.norm_pre = nn.LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.dropout)
        init_weights(self.transformer)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> Tokens:
        """x: (B, 3, H, W); keep: optional (B, K) indices of patches to keep (FLIP-style masking)."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, P, D)
        x = x + self.pos_embed[:, 1:]
        if keep is not None:
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = self.norm_pre(torch.cat([cls, x], dim=1))
        return Tokens(self.transformer(x), None)  # (B, 1 + P, D)

    def pool(self, out: Tokens) -> torch.Tensor:
        return out.tokens[:, 0] if self.cfg.pool == "cls" else out.tokens[:, 1:].mean(1)

    @classmethod
    def example_input(cls, cfg: ViTConfig, batch: int = 2) -> torch.Tensor:
        size = cfg.image_size or 224
        return torch.randn(batch, 3, size, size)
