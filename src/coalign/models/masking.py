"""The one masking path of the patch towers (ViT, audio spectrogram, point cloud).

A maskable tower splits its encoding in two halves:

    patches = tower.patches(x, targets=True)     # Patches: (B, P, D) embedded patches, positions added
    tokens = tower.encode_patches(patches.tokens, keep)   # only the (B, K) kept patches, then the stack

and `forward(x, keep)` is exactly `encode_patches(patches(x).tokens, keep)`. FLIP's patch dropping,
MAE and its audio and point-cloud relatives, M3AE and data2vec's student all go through
`keep_patches`: a gather of the kept patches' tokens, positions already added, before any prefix
token (CLS) and before the transformer, so the encoder's compute falls with the mask ratio.

`Patches` also carries what a masked autoencoder needs beside the tokens: the reconstruction target
of each patch (pixels, log-mel values, the points of a local patch) and where each patch sits (a
grid for images and spectrograms, the centre's xyz for point patches), for the decoder's positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


def random_keep(batch: int, patches: int, mask_ratio: float, device: torch.device) -> torch.Tensor:
    """(B, K) sorted indices of the patches each sample keeps, K = round(P * (1 - mask_ratio)) >= 1."""
    k = max(1, round(patches * (1 - mask_ratio)))
    noise = torch.rand(batch, patches, device=device)
    return noise.argsort(dim=1)[:, :k].sort(dim=1).values


def keep_patches(tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """(B, P, D) patch tokens -> (B, K, D) those at the `keep` (B, K) indices (all when None)."""
    if keep is None:
        return tokens
    return torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def hidden_mask(keep: torch.Tensor, patches: int) -> torch.Tensor:
    """(B, P) bool, True at the patches `keep` (B, K) leaves out."""
    return torch.ones(keep.shape[0], patches, dtype=torch.bool, device=keep.device).scatter(1, keep, False)


def patchify(x: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, P, ph * pw * C), patches in row-major order (as a stride-`patch`
    convolution lays out its output), each patch's values row-major with the channels last (MAE's
    layout). Images: C = 3, square patches; spectrograms: C = 1, (mel bins, frames) patches."""
    (ph, pw), (B, C, H, W) = patch, x.shape
    x = x.reshape(B, C, H // ph, ph, W // pw, pw)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // ph) * (W // pw), ph * pw * C)


@dataclass
class Patches:
    """A batch cut into P patches, as a maskable tower's `patches` returns it."""

    tokens: torch.Tensor  # (B, P, D) embedded patches with their positions, before any prefix token
    # What a masked autoencoder reconstructs: `values` (B, P, T) compared value by value (mean
    # squared error), or `set` (B, P, k, 3), the points of each patch, compared as a set (Chamfer).
    target: torch.Tensor | None = None
    kind: Literal["values", "set"] = "values"
    grid: tuple[int, int] | None = None  # (rows, cols) of a patch grid, row-major: images, spectrograms
    centres: torch.Tensor | None = None  # (B, P, 3) where each patch sits, for point patches

    @property
    def count(self) -> int:
        return self.tokens.shape[1]


def is_maskable(tower: object) -> bool:
    """Whether a tower offers the masking hooks (`patches` and `encode_patches`)."""
    return callable(getattr(tower, "patches", None)) and callable(getattr(tower, "encode_patches", None))
