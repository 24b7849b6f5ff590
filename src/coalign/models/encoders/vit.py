"""Vision Transformer image encoder (tiny to ViT-B/16 by configuration)."""

from __future__ import annotations

from typing import Literal

import pydantic
import torch
from torch import nn

from coalign.models.encoders.base import Dropout, Encoder, EncoderConfig, MlpRatio, Positive, Tokens
from coalign.models.layers import (
    MLP,
    Activation,
    PatchConv,
    Transformer,
    init_scaled,
    init_weights,
    sincos_grid,
)
from coalign.models.masking import Patches, keep_patches, patchify, random_keep
from coalign.registry import ENCODERS


class ViTConfig(EncoderConfig):
    image_size: Positive | None = None  # taken from the image transform when unset
    # patch: one linear projection per patch (ViT). conv: a stack of stride-2 3x3 convolutions down to
    # the patch grid (Xiao et al. 2021, "Early convolutions help transformers see better"): far more
    # sample-efficient on small data, which is what a CPU-sized run has.
    stem: Literal["patch", "conv"] = "patch"
    patch_size: Positive = 16
    width: Positive = 768
    depth: Positive = 12
    heads: Positive = 12
    mlp_ratio: MlpRatio = 4.0
    dropout: Dropout = 0.0
    # cls: the class token; mean: the patch tokens' mean; map: multi-head attention pooling (a learnt
    # probe attends over the tokens, then LayerNorm + MLP residual: SigLIP's head, `AttentionPool`)
    pool: Literal["cls", "mean", "map"] = "cls"
    class_token: bool = True  # false: patch tokens only (SigLIP), then pool must be mean or map
    # What converted checkpoints need (OpenAI / OpenCLIP / Hugging Face CLIP): their patch projection
    # has no bias, OpenAI's MLPs use QuickGELU, SigLIP's layer norms eps 1e-6; `norm_pre: false` is
    # OpenCLIP's `no_ln_pre`. The defaults are coalign's own towers.
    patch_bias: bool = True
    norm_pre: bool = True
    act: Activation = "gelu"
    norm_eps: float = pydantic.Field(1e-5, gt=0.0)
    # The positions' initial code. random (CLIP's normal, std width**-0.5) lets the patch content
    # dominate each token; 2-D sin-cos at its own RMS (0.71) dominates it, which makes position easy
    # and shape hard: in benchmarks/vs_openclip.py (512 steps, seed 0) sin-cos gave shape zero-shot
    # 0.26 (scenes) / 0.21 (world) against 0.39 / 0.52 for random and 0.38 / 0.45 for OpenCLIP.
    pos_init: Literal["random", "sincos"] = "random"
    pos_std: float | None = pydantic.Field(
        None, gt=0
    )  # RMS of the initial code; None: width**-0.5 or sincos's own
    # FLIP (Li et al. 2023): while training, encode only a random (1 - mask_ratio) of the patches.
    # Compute falls roughly in proportion, so more pairs fit in the same time; evaluation sees all.
    mask_ratio: float = pydantic.Field(0.0, ge=0.0, lt=1.0)

    @classmethod
    def tiny(cls) -> dict:
        return {"width": 32, "depth": 1, "heads": 2}

    @pydantic.model_validator(mode="after")
    def _pool_has_its_token(self) -> ViTConfig:
        if self.pool == "cls" and not self.class_token:
            raise ValueError("pool 'cls' needs class_token: true; without one use pool 'mean' or 'map'")
        return self

    @pydantic.field_validator("patch_size")
    @classmethod
    def _patches_tile_the_image(cls, p: int, info: pydantic.ValidationInfo) -> int:
        image_size, stem = info.data.get("image_size"), info.data.get("stem")
        if stem == "conv" and p & (p - 1):
            raise ValueError(
                f"stem 'conv' needs a power-of-two patch_size, got {p} (it halves the image "
                "log2(patch_size) times); or use stem 'patch'"
            )
        if image_size is not None and image_size % p:
            raise ValueError(f"image_size {image_size} must be divisible by patch_size {p}")
        return p


def conv_stem(width: int, patch_size: int) -> nn.Sequential:
    """3x3 stride-2 convolutions halving the resolution log2(patch_size) times, then a 1x1 to `width`."""
    n = patch_size.bit_length() - 1
    if 2**n != patch_size:
        raise ValueError(f"stem 'conv' needs a power-of-two patch_size, got {patch_size}")
    layers: list[nn.Module] = []
    channels = 3
    for i in range(n):
        out = max(16, width // 2 ** (n - 1 - i))
        layers += [nn.Conv2d(channels, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        channels = out
    layers.append(nn.Conv2d(channels, width, 1))
    return nn.Sequential(*layers)


class AttentionPool(nn.Module):
    """Multi-head attention pooling ("MAP", Zhai et al. 2022; SigLIP's vision head): one learnt probe
    attends over the tokens, then a LayerNorm + MLP residual; the probe's row is the pooled vector.

    `nn.MultiheadAttention` keeps its fused `in_proj_*` / `out_proj` tensors, the layout SigLIP's
    checkpoints store, so converters copy them as they are."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str, eps: float):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, int(width * mlp_ratio), act)
        init_weights(self.mlp)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, D)"""
        probe = self.probe.expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        x = self.attention(probe, tokens, tokens, need_weights=False)[0]
        return (x + self.mlp(self.norm(x)))[:, 0]


@ENCODERS.register("vit")
class ViT(Encoder):
    Config = ViTConfig
    modality = "image"
    input_ndim = 4
    num_prefix_tokens = 1  # the CLS token; 0 with class_token: false

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        size = cfg.image_size or 224
        if size % cfg.patch_size:
            raise ValueError(f"image_size {size} must be divisible by patch_size {cfg.patch_size}")
        self.cfg, self.width = cfg, cfg.width
        self.grid = size // cfg.patch_size
        self.patch_embed = (
            conv_stem(cfg.width, cfg.patch_size)
            if cfg.stem == "conv"
            else PatchConv(3, cfg.width, cfg.patch_size, bias=cfg.patch_bias)
        )
        # Not zeros: the CLS row (token + its zero position) goes through norm_pre, and a LayerNorm
        # of a constant row has gradient 1 / sqrt(eps) ~ 300x; a zero CLS token carried >70% of the
        # whole model's gradient norm for the first ~40 steps (benchmarks/vs_openclip.py), so a
        # clipped run barely moved the rest. CLIP's scale, width ** -0.5, keeps the row at the
        # patch tokens' order of magnitude.
        self.num_prefix_tokens = prefix = int(cfg.class_token)
        if cfg.class_token:
            self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.width) * cfg.width**-0.5)
        # Learnable; initialised as `pos_init` says (2-D sin-cos is MAE's fixed code).
        if cfg.pos_init == "random":
            pos = torch.randn(prefix + self.grid**2, cfg.width) * (cfg.pos_std or cfg.width**-0.5)
        else:
            pos = torch.cat(
                [torch.zeros(prefix, cfg.width), sincos_grid(self.grid, self.grid, cfg.width).flatten(0, 1)]
            )
            if cfg.pos_std is not None:
                pos = pos * cfg.pos_std / pos[prefix:].pow(2).mean().sqrt()
        self.pos_embed = nn.Parameter(pos.unsqueeze(0))  # (1, prefix + P, D)
        self.norm_pre = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.norm_pre else nn.Identity()
        self.transformer = Transformer(
            cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.dropout, cfg.act, cfg.norm_eps
        )
        init_scaled(self.transformer)
        if cfg.pool == "map":
            self.map = AttentionPool(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.norm_eps)

    def patches(self, x: torch.Tensor, targets: bool = False) -> Patches:
        """x: (B, 3, H, W) -> its (B, P, D) patch tokens with positions (models/masking.py); with
        `targets`, each patch's pixels (B, P, p * p * 3) for masked reconstruction."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, P, D)
        tokens = tokens + self.pos_embed[:, self.num_prefix_tokens :]
        p = self.cfg.patch_size
        target = patchify(x, (p, p)) if targets else None
        return Patches(tokens, target, "values", grid=(self.grid, self.grid))

    def encode_patches(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> Tokens:
        """(B, P, D) patch tokens -> Tokens of the CLS (if the tower has one) and the `keep` (B, K)
        patches (all when None; FLIP's random subset when training with `mask_ratio`)."""
        if keep is None and self.training and self.cfg.mask_ratio > 0:
            keep = random_keep(x.shape[0], x.shape[1], self.cfg.mask_ratio, x.device)
        x = keep_patches(x, keep)  # (B, K, D)
        if self.cfg.class_token:
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
        return Tokens(self.transformer(self.norm_pre(x)), None)  # (B, prefix + K, D)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> Tokens:
        """x: (B, 3, H, W); keep: optional (B, K) indices of patches to keep (FLIP-style masking)."""
        return self.encode_patches(self.patches(x).tokens, keep)

    def pool(self, out: Tokens) -> torch.Tensor:
        if self.cfg.pool == "map":
            return self.map(out.tokens)
        return out.tokens[:, 0] if self.cfg.pool == "cls" else out.tokens[:, self.num_prefix_tokens :].mean(1)

    @classmethod
    def example_input(cls, cfg: ViTConfig, batch: int = 2) -> torch.Tensor:
        size = cfg.image_size or 224
        return torch.randn(batch, 3, size, size)
