"""Masked autoencoding of any patch tower beside a contrastive loss: MAE for images (He et al. 2022,
arXiv:2111.06377), Audio-MAE for spectrograms (Huang et al. 2022, arXiv:2207.06405), Point-MAE for
point clouds (Pang et al. 2022, arXiv:2203.06604).

The tower encodes only a random (1 - mask_ratio) of its patches, through its one masking path
(`models/masking.py`: the same `keep` indices the ViT takes for FLIP's patch dropping). A light
decoder (its own width and depth) gets the visible tokens back in place among a learnt mask token at
every hidden position, adds each patch's position, and predicts each patch's target:

- `vit`: the patch's pixels (p * p * 3, channels last), in the image transform's normalised space;
- `audio_transformer`: the patch's log-mel values (pf * pt), after the tower's per-example
  standardisation;
- `point_transformer`: the patch's k points (xyz relative to its centre), as a set.

Decoder positions: fixed 2-D sin-cos over the patch grid (MAE, Audio-MAE), or for point patches a
small MLP of the centre's xyz (Point-MAE; the centres of hidden patches are known, their points are
not). The loss counts the *hidden* patches only: for pixels and spectrograms the mean squared error
against targets normalised per patch (`norm_pix`, MAE's default: each patch minus its mean, over its
std), for points the L2 Chamfer distance between the predicted and the true k points.

The objective re-encodes the batch's inputs (as the distillation teacher and MLM re-encode theirs),
so it adds to any recipe: `mae_clip` trains CLIP on the full images and MAE on the masked ones, one
tower for both. The decoder lives in the objective: it is trained, saved and restored with the run
and is not part of the model that evaluation and serving load.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pydantic
import torch
from torch import nn

from coalign.models.layers import Transformer, init_weights, sincos_grid
from coalign.models.masking import Patches, hidden_mask, is_maskable, patchify, random_keep
from coalign.models.model import Features
from coalign.objectives.base import Objective, ObjectiveConfig
from coalign.objectives.distributed import Rows, own_rows
from coalign.registry import OBJECTIVES, ConfigError

__all__ = [
    "MAE",
    "DecoderOptions",
    "DecoderSize",
    "MaskedDecoder",
    "chamfer_l2",
    "masked_tower",
    "named_for",
    "probe_patches",
    "patch_loss",
    "patchify",
    "set_loss",
]

NORM_EPS = 1e-6  # MAE's: added to the per-patch variance of the targets
MASKABLE = "vit, audio_transformer or point_transformer"  # the towers with masking hooks


class DecoderSize(ObjectiveConfig):
    """The light decoder of masked-prediction objectives (MAE's 8 x 512 at full size)."""

    decoder_width: int = pydantic.Field(128, ge=8)
    decoder_depth: int = pydantic.Field(2, ge=1)
    decoder_heads: int = pydantic.Field(4, ge=1)

    @classmethod
    def tiny(cls) -> dict:
        return {"decoder_width": 16, "decoder_depth": 1, "decoder_heads": 2}

    @pydantic.model_validator(mode="after")
    def _heads_divide(self):
        if self.decoder_width % self.decoder_heads:
            raise ValueError(
                f"decoder_width {self.decoder_width} must be divisible by decoder_heads {self.decoder_heads}"
            )
        if self.decoder_width % 4:
            raise ValueError(f"decoder_width {self.decoder_width} must be divisible by 4 (2-D sin-cos)")
        return self


class DecoderOptions(DecoderSize):
    """One masked tower and its decoder."""

    batch_key_fields: ClassVar[tuple[str, ...]] = ("modality",)

    modality: str = "image"  # the batch key whose tower is masked; the tower must have masking hooks
    mask_ratio: float = pydantic.Field(0.75, gt=0.0, lt=1.0)  # fraction of patches hidden


class MAEConfig(DecoderOptions):
    norm_pix: bool = True  # pixel / spectrogram targets normalised per patch (MAE's default)


def patch_loss(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, norm: bool) -> torch.Tensor:
    """Mean over hidden patches of the per-patch mean squared error between `pred` (B, P, T) and
    `target` (B, P, T), each target patch normalised (minus its mean, over its std) when `norm`;
    `keep` (B, K) are the visible patches, which do not count."""
    target = target.float()
    if norm:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + NORM_EPS).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(-1)  # (B, P)
    hidden = hidden_mask(keep, per_patch.shape[1]).to(per_patch.dtype)
    return (per_patch * hidden).sum() / hidden.sum()


def chamfer_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(n, k, 3), (n, m, 3) -> (n,) L2 Chamfer distance of each pair of point sets: the mean squared
    distance from each predicted point to its nearest true point plus the mean from each true point
    to its nearest prediction (Point-MAE's ChamferDistanceL2)."""
    d = (pred.float()[:, :, None] - target.float()[:, None]).pow(2).sum(-1)  # (n, k, m)
    return d.min(dim=2).values.mean(1) + d.min(dim=1).values.mean(1)


def set_loss(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean Chamfer distance over hidden patches: pred (B, P, k * 3), target (B, P, k, 3)."""
    B, P, k = target.shape[:3]
    hidden = hidden_mask(keep, P)  # (B, P)
    return chamfer_l2(pred.view(B, P, k, 3)[hidden], target[hidden]).mean()


def masked_tower(name: str, model: nn.Module, modality: str) -> nn.Module:
    """The model's tower of `modality`, which must offer the masking hooks (models/masking.py)."""
    tower = model.towers[modality] if modality in getattr(model, "towers", {}) else None
    if tower is None or not is_maskable(tower):
        got = "no tower" if tower is None else f"a '{type(tower).__name__}' tower"
        raise ConfigError(
            f"{name}: modality '{modality}' has {got}; masked prediction needs a patch tower ({MASKABLE})"
        )
    return tower


def named_for(base: str, modality: str) -> str:
    """The objective's name in the logs: `base` for images, `base_<modality>` otherwise, so one
    recipe can mask several towers (`mae_audio_loss` beside `mae_points_loss`)."""
    return base if modality == "image" else f"{base}_{modality}"


@torch.no_grad()
def probe_patches(tower: nn.Module) -> Patches:
    """The patches (with targets) of one example input: what a decoder's sizes are read from."""
    x = tower.example_input(tower.cfg, batch=1)
    return tower.patches(x.to(next(tower.parameters()).device), targets=True)


class MaskedDecoder(nn.Module):
    """Visible tokens (B, prefix + K, D_tower) -> predictions (B, P, out_dim) for every patch.

    The tokens are projected to the decoder width, put back at their patch among a learnt mask token
    at the hidden ones, given their patch's position (fixed 2-D sin-cos over a grid; a learnt MLP of
    the centre for point patches; zero for prefix tokens), run through a light transformer and read
    out by a linear head."""

    def __init__(
        self, in_width: int, width: int, depth: int, heads: int, out_dim: int, prefix: int, centres: bool
    ):
        super().__init__()
        self.width, self.prefix = width, prefix
        self.embed = nn.Linear(in_width, width)
        self.mask_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        # Point-MAE's decoder positions: its own MLP of each centre (not shared with the encoder)
        self.centre_pos = (
            nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, width)) if centres else None
        )
        self.decoder = Transformer(width, depth, heads)
        self.head = nn.Linear(width, out_dim)
        init_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def positions(self, patches: Patches, dtype: torch.dtype) -> torch.Tensor:
        """(1 or B, P, width) each patch's decoder position."""
        if self.centre_pos is not None:
            return self.centre_pos(patches.centres.to(dtype))
        if patches.grid is None:
            raise ValueError("patches need a grid or centres for the decoder's positions")
        pos = sincos_grid(*patches.grid, self.width).flatten(0, 1).unsqueeze(0)  # (1, P, width)
        return pos.to(device=patches.tokens.device, dtype=dtype)

    def fill(self, tokens: torch.Tensor, keep: torch.Tensor, patches: Patches) -> torch.Tensor:
        """(B, prefix + K, D_tower) visible tokens -> (B, prefix + P, width) the decoder's input:
        projected, at their patch among mask tokens, positions added (none on prefix tokens)."""
        x = self.embed(tokens)  # (B, prefix + K, Dd)
        B, P, D, n = x.shape[0], patches.count, x.shape[-1], self.prefix
        grid = self.mask_token.to(x.dtype).expand(B, P, D)
        grid = grid.scatter(1, keep.unsqueeze(-1).expand(-1, -1, D), x[:, n:])
        return torch.cat([x[:, :n], grid + self.positions(patches, x.dtype)], dim=1)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor, patches: Patches) -> torch.Tensor:
        out = self.decoder(self.fill(tokens, keep, patches))
        return self.head(out[:, self.prefix :])  # (B, P, out_dim)


@OBJECTIVES.register("mae")
class MAE(Objective):
    Config = MAEConfig
    name = "mae"
    needs_inputs = True  # encodes the batch's inputs again, with patches hidden

    def __init__(self, cfg: MAEConfig | None = None, **kwargs: Any):
        super().__init__(cfg, **kwargs)
        self.name = named_for("mae", self.cfg.modality)

    def bind(self, model: nn.Module, transforms: dict[str, Any] | None = None) -> None:
        tower = masked_tower(self.name, model, self.cfg.modality)
        # the tower belongs to the model (and the Task): keep it unregistered here, as FusedObjective does
        object.__setattr__(self, "_tower", tower)
        probe = probe_patches(tower)  # one example's patches tell the target's size
        c = self.cfg
        self.decoder = MaskedDecoder(
            tower.width,
            c.decoder_width,
            c.decoder_depth,
            c.decoder_heads,
            int(probe.target[0, 0].numel()),  # one patch's flattened target
            int(tower.num_prefix_tokens),
            centres=probe.centres is not None,
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        # Runs saved before the decoder became its own part (2026-12-01) hold its tensors directly
        # under the objective (`embed`, `mask_token`, `decoder.<layers>`, `head`): move them under
        # `decoder.` so those checkpoints still load and resume.
        if prefix + "mask_token" in state_dict:
            for key in [k for k in state_dict if k.startswith(prefix)]:
                state_dict[prefix + "decoder." + key[len(prefix) :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reconstruct(
        self, x: Any, keep: torch.Tensor | None = None, own: Rows | None = None
    ) -> tuple[torch.Tensor, Patches, torch.Tensor]:
        """(predictions (B, P, T) for every patch, the patches with their targets, keep (B, K)) of
        the `own` rows of `x` (all of them by default; `Rows.pick`). The masks are drawn for every
        row of `x`, so each rank hides what a single process would."""
        own = own or Rows.every(x.shape[0])
        patches = self._tower.patches(own.pick(x), targets=True)
        if keep is None:
            keep = own.pick(random_keep(own.total, patches.count, self.cfg.mask_ratio, patches.tokens.device))
        tokens = self._tower.encode_patches(patches.tokens, keep).tokens  # (B, prefix + K, D)
        return self.decoder(tokens, keep, patches), patches, keep

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = batch.get(self.cfg.modality)
        if not isinstance(x, torch.Tensor) or x.shape[0] == 0:
            zero = next(self.parameters()).sum() * 0.0  # keeps the graph (and DDP) whole
            return {f"{self.name}_loss": zero}
        # under several ranks each re-encodes its own rows of the gathered batch (local loss)
        own = own_rows(batch, (self.cfg.modality,), x.shape[0])
        pred, patches, keep = self.reconstruct(x, own=own)
        if patches.kind == "set":
            loss = set_loss(pred, patches.target, keep)
        else:
            loss = patch_loss(pred, patches.target, keep, self.cfg.norm_pix)
        return {f"{self.name}_loss": own.share(loss)}  # every row hides as many patches
