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

from dataclasses import dataclass, replace
from typing import Literal

import torch


def random_keep(batch: int, patches: int, mask_ratio: float, device: torch.device) -> torch.Tensor:
    """(B, K) sorted indices of the patches each sample keeps, K = round(P * (1 - mask_ratio)) >= 1."""
    k = max(1, round(patches * (1 - mask_ratio)))
    noise = torch.rand(batch, patches, device=device)
    return noise.argsort(dim=1)[:, :k].sort(dim=1).values


def block_keep(
    batch: int, grid: tuple[int, int], mask_ratio: float, block: int, device: torch.device
) -> torch.Tensor:
    """(B, K) sorted indices of the patches each sample keeps, as `random_keep` (same K), but the
    kept patches come in contiguous blocks: data2vec 2.0's inverse block masking (Baevski et al.
    2022, arXiv:2212.07525), which hides all but a few `block` x `block` squares of the grid, so the
    student must predict whole regions rather than fill in single patches from their neighbours.

    Squares at uniformly random centres (clipped at the grid's edges) are added to each sample's
    visible set until it holds at least K patches; the excess is dropped at random among them (as
    data2vec's `require_same_masks` evens the counts), so every sample keeps exactly K."""
    rows, cols = grid
    P = rows * cols
    k = max(1, round(P * (1 - mask_ratio)))
    seen = torch.zeros(batch, rows, cols, dtype=torch.bool, device=device)
    r, c = torch.arange(rows, device=device), torch.arange(cols, device=device)
    short = torch.ones(batch, dtype=torch.bool, device=device)
    while short.any():  # each round adds >= 1 patch to every short sample: at most K rounds
        top = torch.randint(0, rows, (batch, 1), device=device) - block // 2  # (B, 1) square corners
        left = torch.randint(0, cols, (batch, 1), device=device) - block // 2
        in_rows = (r >= top) & (r < top + block)  # (B, rows)
        in_cols = (c >= left) & (c < left + block)  # (B, cols)
        square = in_rows[:, :, None] & in_cols[:, None, :]  # (B, rows, cols)
        seen |= square & short[:, None, None]
        short = seen.flatten(1).sum(1) < k
    # the K kept: every patch of the squares but a random few of the excess
    score = seen.flatten(1).float() + torch.rand(batch, P, device=device) * 0.5
    return score.topk(k, dim=1).indices.sort(dim=1).values


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

    def repeat(self, times: int) -> Patches:
        """Each sample's patches `times` times over, as consecutive rows (sample b's copy m at row
        b * times + m): one embedding of the patches serves several masks (data2vec 2.0)."""
        if times == 1:
            return self

        def rep(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat_interleave(times, dim=0)

        return replace(self, tokens=rep(self.tokens), target=rep(self.target), centres=rep(self.centres))


def is_maskable(tower: object) -> bool:
    """Whether a tower offers the masking hooks (`patches` and `encode_patches`)."""
    return callable(getattr(tower, "patches", None)) and callable(getattr(tower, "encode_patches", None))
