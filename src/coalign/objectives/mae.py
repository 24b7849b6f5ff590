"""Masked autoencoding of images (MAE, He et al. 2022, arXiv:2111.06377) beside a contrastive loss.

The image tower encodes only a random (1 - mask_ratio) of its patches: the same `keep` indices the
ViT takes for FLIP's patch dropping (`vit.random_keep`), so there is one masking path, not two. A
light decoder (its own width and depth) gets the visible tokens back in place among a learnt mask
token at every hidden position, adds fixed 2-D sin-cos positions, and predicts each patch's pixels.
The loss is the mean squared error on the *hidden* patches only, against targets normalised per
patch (`norm_pix`, MAE's default: each patch minus its mean, over its std), in the image transform's
normalised pixel space.

The objective re-encodes the batch's images (as the distillation teacher and MLM re-encode theirs),
so it adds to any recipe: `mae_clip` trains CLIP on the full images and MAE on the masked ones, one
tower for both (M3AE / CLIP+MAE style). The decoder lives in the objective: it is trained, saved and
restored with the run and is not part of the model that evaluation and serving load.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pydantic
import torch
from torch import nn

from coalign.models.encoders.vit import ViT, random_keep
from coalign.models.layers import Transformer, init_weights, sincos_grid
from coalign.models.model import Features
from coalign.objectives.base import Objective, ObjectiveConfig
from coalign.registry import OBJECTIVES, ConfigError

NORM_EPS = 1e-6  # MAE's: added to the per-patch variance of the targets


class MAEConfig(ObjectiveConfig):
    batch_key_fields: ClassVar[tuple[str, ...]] = ("modality",)

    modality: str = "image"  # the batch key of the images; its tower must be a ViT
    mask_ratio: float = pydantic.Field(0.75, gt=0.0, lt=1.0)  # fraction of patches hidden
    decoder_width: int = pydantic.Field(128, ge=8)
    decoder_depth: int = pydantic.Field(2, ge=1)
    decoder_heads: int = pydantic.Field(4, ge=1)
    norm_pix: bool = True  # targets normalised per patch (MAE's better-representation default)

    @classmethod
    def tiny(cls) -> dict:
        return {"decoder_width": 16, "decoder_depth": 1, "decoder_heads": 2}

    @pydantic.model_validator(mode="after")
    def _heads_divide(self) -> MAEConfig:
        if self.decoder_width % self.decoder_heads:
            raise ValueError(
                f"decoder_width {self.decoder_width} must be divisible by decoder_heads {self.decoder_heads}"
            )
        return self


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, P, patch * patch * C), patches in the ViT's row-major order, each patch's
    pixels row-major with the channels last (as MAE lays them out)."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def mae_loss(
    pred: torch.Tensor, images: torch.Tensor, keep: torch.Tensor, patch: int, norm_pix: bool
) -> torch.Tensor:
    """Mean over hidden patches of the per-patch mean squared error between `pred` (B, P, p*p*C) and
    the images' patches; `keep` (B, K) are the visible patches, which do not count."""
    target = patchify(images, patch).float()
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + NORM_EPS).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(-1)  # (B, P)
    hidden = torch.ones_like(per_patch).scatter(1, keep, 0.0)
    return (per_patch * hidden).sum() / hidden.sum()


@OBJECTIVES.register("mae")
class MAE(Objective):
    Config = MAEConfig
    name = "mae"
    needs_inputs = True  # encodes the batch's images again, with patches hidden

    def bind(self, model: nn.Module, transforms: dict[str, Any] | None = None) -> None:
        m = self.cfg.modality
        tower = model.towers[m] if m in getattr(model, "towers", {}) else None
        if not isinstance(tower, ViT):
            got = "no tower" if tower is None else f"a '{type(tower).__name__}' tower"
            raise ConfigError(f"mae: modality '{m}' has {got}; masked autoencoding needs a 'vit' tower")
        # the tower belongs to the model (and the Task): keep it unregistered here, as FusedObjective does
        object.__setattr__(self, "_tower", tower)
        c, p, grid = self.cfg, tower.cfg.patch_size, tower.grid
        self.patch = p
        self.embed = nn.Linear(tower.width, c.decoder_width)
        self.mask_token = nn.Parameter(torch.randn(1, 1, c.decoder_width) * 0.02)
        pos = torch.cat(
            [torch.zeros(1, c.decoder_width), sincos_grid(grid, grid, c.decoder_width).flatten(0, 1)]
        )
        self.register_buffer("pos", pos.unsqueeze(0), persistent=False)  # (1, 1 + P, Dd), fixed
        self.decoder = Transformer(c.decoder_width, c.decoder_depth, c.decoder_heads)
        self.head = nn.Linear(c.decoder_width, p * p * 3)
        for part in (self.embed, self.decoder, self.head):
            init_weights(part)

    def reconstruct(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(B, P, p*p*3) pixel predictions for every patch, from the visible patches `keep` (B, K)."""
        tokens = self.embed(self._tower(images, keep).tokens)  # (B, 1 + K, Dd): CLS, then visible
        B, P, D = tokens.shape[0], self.pos.shape[1] - 1, tokens.shape[-1]
        grid = self.mask_token.to(tokens.dtype).expand(B, P, D)
        grid = grid.scatter(1, keep.unsqueeze(-1).expand(-1, -1, D), tokens[:, 1:])
        x = torch.cat([tokens[:, :1], grid], dim=1) + self.pos.to(tokens.dtype)
        return self.head(self.decoder(x)[:, 1:])

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch.get(self.cfg.modality)
        if not isinstance(images, torch.Tensor) or images.shape[0] == 0:
            zero = next(self.parameters()).sum() * 0.0  # keeps the graph (and DDP) whole
            return {"mae_loss": zero}
        keep = random_keep(images.shape[0], self.pos.shape[1] - 1, self.cfg.mask_ratio, images.device)
        pred = self.reconstruct(images, keep)
        return {"mae_loss": mae_loss(pred, images, keep, self.patch, self.cfg.norm_pix)}
