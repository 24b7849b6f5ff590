"""The one encoder contract.

    tokens = encoder(x)            # Tokens(tokens (B, N, D), mask (B, N) bool or None)
    pooled = encoder.pool(tokens)  # (B, D)

`x` is what the modality's transform and collate produce (images: (B, 3, H, W); text: (B, L) ids).
`mask` marks real tokens (False = padding); objectives that work on tokens (FILIP, ITM, MLM,
captioning) use it, the rest use the pooled vector through a projection head.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn


class Tokens(NamedTuple):
    tokens: torch.Tensor  # (B, N, D)
    mask: torch.Tensor | None  # (B, N) bool, True = real token


class Encoder(nn.Module):
    width: int  # D, the token width
    input_ndim: int  # dimensions of one batch of inputs: 4 for (B, 3, H, W) images, 2 for (B, L) ids
    num_prefix_tokens: int = 0  # leading tokens that are not content (a ViT's CLS), timm's name

    def valid_items(self, x: Any) -> torch.Tensor:
        """(n,) bool: which inputs are real. Groups of items (several captions per sample) pad with
        empty items; an encoder whose inputs can be empty says which are (text: all-padding rows)."""
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)

    def forward(self, x: Any) -> Tokens:
        raise NotImplementedError

    def pool(self, out: Tokens) -> torch.Tensor:
        raise NotImplementedError

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        for m in self.modules():
            if hasattr(m, "grad_checkpointing"):
                m.grad_checkpointing = enabled

    @classmethod
    def example_input(cls, cfg: Any, batch: int = 2) -> Any:
        """A valid input batch, so tests can run every registered encoder generically."""
        raise NotImplementedError


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, N, D), (B, N) -> (B, D) mean over real tokens."""
    if mask is None:
        return tokens.mean(1)
    w = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)
