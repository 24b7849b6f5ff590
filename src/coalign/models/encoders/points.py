"""Point-cloud Transformer (Point-BERT, Yu et al. 2022): points -> local patches -> Transformer.

A cloud is cut into G local patches: farthest-point sampling picks G well-spread centres, each
centre takes its k nearest points, and a small PointNet shared by all patches turns the k points
(relative to their centre) into one token. The Transformer then reasons over patches, as a ViT does
over image patches; the centre's xyz, through a small MLP, is the token's position.

FPS starts from the point farthest from the centroid, not from point 0, so the chosen centres (and
hence the output) do not depend on the order of the input points.
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch
from torch import nn

from coalign.models.encoders.base import Dropout, Encoder, EncoderConfig, MlpRatio, Positive, Tokens
from coalign.models.layers import Transformer, init_weights
from coalign.models.masking import Patches, keep_patches
from coalign.registry import ENCODERS


class PointsConfig(EncoderConfig):
    num_points: Positive | None = None  # taken from the points transform when unset
    channels: pydantic.NonNegativeInt | None = None  # extra channels after xyz (RGB: 3); likewise
    groups: Positive = 64  # G patches (tokens)
    group_size: Positive = 32  # k points per patch
    pointnet_width: Positive | None = (
        None  # per-point feature width in the patch PointNet; width // 2 when unset
    )
    width: Positive = 384
    depth: Positive = 12
    heads: Positive = 6
    mlp_ratio: MlpRatio = 4.0
    dropout: Dropout = 0.0
    pool: Literal["cls", "mean"] = "cls"  # cls adds a CLS token; mean averages the patch tokens

    @classmethod
    def tiny(cls) -> dict:
        return {"width": 32, "depth": 1, "heads": 2, "groups": 16, "group_size": 16}

    @pydantic.field_validator("groups", "group_size")
    @classmethod
    def _within_the_cloud(cls, value: int, info: pydantic.ValidationInfo) -> int:
        points = info.data.get("num_points")
        if points is not None and value > points:
            raise ValueError(f"{value} exceeds num_points {points}")
        return value


def farthest_point_sample(xyz: torch.Tensor, count: int) -> torch.Tensor:
    """(B, N, 3) -> (B, count) indices of well-spread points; the first is the farthest from the centroid.

    Each step takes the point farthest from those already chosen. Vectorised over the batch; the
    loop runs `count` times, each step O(N).
    """
    B, N, _ = xyz.shape
    rows = torch.arange(B, device=xyz.device)
    centroid = xyz.mean(dim=1, keepdim=True)  # (B, 1, 3)
    nearest = (xyz - centroid).square().sum(-1)  # (B, N) distance to the chosen set, seeded by the centroid
    chosen = torch.empty(B, count, dtype=torch.long, device=xyz.device)
    for i in range(count):
        chosen[:, i] = nearest.argmax(dim=1)
        last = xyz[rows, chosen[:, i]]  # (B, 3)
        d = (xyz - last[:, None]).square().sum(-1)  # (B, N)
        nearest = d if i == 0 else torch.minimum(nearest, d)
    return chosen


def knn(query: torch.Tensor, xyz: torch.Tensor, k: int) -> torch.Tensor:
    """(B, G, 3), (B, N, 3) -> (B, G, k) indices of each query's k nearest points, nearest first."""
    # Exact differences, not the |a|^2 + |b|^2 - 2ab matrix product: that cancels badly for close points.
    d = torch.cdist(query, xyz, compute_mode="donot_use_mm_for_euclid_dist")  # (B, G, N)
    return d.topk(k, dim=-1, largest=False, sorted=True).indices


def gather_points(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, N, C), (B, *S) long -> (B, *S, C)."""
    B, C = points.shape[0], points.shape[-1]
    flat = idx.reshape(B, -1, 1).expand(-1, -1, C)
    return torch.gather(points, 1, flat).view(*idx.shape, C)


class CloudNorm(nn.Module):
    """Standardise each channel over all the points of one cloud: (B, G, k, C) -> same.

    Point-BERT's PointNet uses BatchNorm here. Without any such normalisation, the per-point features
    share one large offset that swamps the local geometry and training crawls; BatchNorm removes it
    but couples the samples of a batch and acts differently in evaluation. Per-cloud statistics
    remove it too, and a cloud's tokens still depend on that cloud alone (and not on point order).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=(1, 2), keepdim=True, correction=0)  # (B, 1, 1, C)
        return (x - mean) * torch.rsqrt(var + 1e-5) * self.weight + self.bias


class PatchPointNet(nn.Module):
    """Shared mini-PointNet (Point-BERT's two-stage one): per-point MLP, max-pool, the patch feature
    joined back onto each point, a second per-point MLP, max-pool, then a projection to one token.

    Per-point layers dominate the encoder's compute (B * G * k points), so they stay `hidden` wide
    and only the pooled patch feature is projected to `width`; the join is W_f f + W_g g, with W_g g
    computed once per patch rather than on a concatenation per point.
    """

    def __init__(self, in_dim: int, hidden: int, width: int):
        super().__init__()
        self.first = nn.Sequential(
            nn.Linear(in_dim, hidden), CloudNorm(hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.join_point = nn.Linear(hidden, hidden)
        self.join_patch = nn.Linear(hidden, hidden, bias=False)
        self.second = nn.Sequential(CloudNorm(hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, G, k, in_dim) -> (B, G, width)."""
        f = self.first(x)  # (B, G, k, h)
        g = self.join_patch(f.max(dim=2).values)  # (B, G, h)
        f = self.second(self.join_point(f) + g[:, :, None])
        return self.proj(f.max(dim=2).values)


@ENCODERS.register("point_transformer")
class PointTransformer(Encoder):
    Config = PointsConfig
    modality = "points"
    input_ndim = 3

    def __init__(self, cfg: PointsConfig):
        super().__init__()
        if cfg.num_points is None or cfg.channels is None:
            raise ValueError(
                "point_transformer needs num_points and channels (normally from the points transform)"
            )
        self.cfg, self.width = cfg, cfg.width
        self.num_prefix_tokens = 1 if cfg.pool == "cls" else 0
        hidden = cfg.pointnet_width or max(32, cfg.width // 2)
        self.patch_embed = PatchPointNet(3 + cfg.channels, hidden, cfg.width)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, cfg.width))
        if cfg.pool == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
            self.cls_pos = nn.Parameter(torch.randn(1, 1, cfg.width) * 0.02)
        self.norm_pre = nn.LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.dropout)
        init_weights(self.transformer)

    def group(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, 3 + C) -> centres (B, G, 3) and patches (B, G, k, 3 + C), xyz relative to the centre."""
        xyz = points[..., :3]
        with torch.no_grad(), torch.autocast(device_type=points.device.type, enabled=False):
            pts = xyz.float()  # indices only, in full precision: ties in half precision reorder neighbours
            centre_idx = farthest_point_sample(pts, self.cfg.groups)  # (B, G)
            neighbours = knn(gather_points(pts, centre_idx), pts, self.cfg.group_size)  # (B, G, k)
        centres = gather_points(xyz, centre_idx)  # (B, G, 3)
        patches = gather_points(points, neighbours)  # (B, G, k, 3 + C)
        rel = patches[..., :3] - centres[:, :, None]
        return centres, torch.cat([rel, patches[..., 3:]], dim=-1)

    def patches(self, points: torch.Tensor, targets: bool = False) -> Patches:
        """points: (B, N, 3 + channels), N >= groups and group_size -> (B, G, D) patch tokens with
        their centres' positions; with `targets`, each patch's k points' xyz relative to its centre
        (B, G, k, 3), the set Point-MAE reconstructs."""
        expected = 3 + self.cfg.channels
        if points.shape[-1] != expected:
            raise ValueError(
                f"points have {points.shape[-1]} values per point; this encoder expects {expected} "
                f"(xyz + {self.cfg.channels} channels)"
            )
        if points.shape[1] < max(self.cfg.groups, self.cfg.group_size):
            raise ValueError(
                f"a cloud of {points.shape[1]} points is smaller than groups ({self.cfg.groups}) or "
                f"group_size ({self.cfg.group_size})"
            )
        centres, patches = self.group(points)
        x = self.patch_embed(patches) + self.pos_embed(centres)  # (B, G, D)
        target = patches[..., :3] if targets else None
        return Patches(x, target, "set", centres=centres)

    def encode_patches(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> Tokens:
        """(B, G, D) patch tokens -> Tokens of the [CLS and] `keep` (B, K) patches (all when None)."""
        x = keep_patches(x, keep)
        if self.cfg.pool == "cls":
            cls = (self.cls_token + self.cls_pos).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
        return Tokens(self.transformer(self.norm_pre(x)), None)  # (B, [1 +] K, D)

    def forward(self, points: torch.Tensor, keep: torch.Tensor | None = None) -> Tokens:
        """points: (B, N, 3 + channels); keep: optional (B, K) indices of the patches to encode."""
        return self.encode_patches(self.patches(points).tokens, keep)

    def pool(self, out: Tokens) -> torch.Tensor:
        return out.tokens[:, 0] if self.cfg.pool == "cls" else out.tokens.mean(1)

    @classmethod
    def example_input(cls, cfg: PointsConfig, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, cfg.num_points, 3 + cfg.channels)
