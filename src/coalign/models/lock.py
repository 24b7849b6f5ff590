"""Locked towers and frozen parts for fine-tuning: LiT (Zhai et al. 2022) locks a pretrained tower and
trains the other tower and the heads; `unlock_last: N` trains only the last N blocks of a locked tower
(OpenCLIP's `lock_image_unlocked_groups`); `freeze_norm` keeps norm layers as they were (weights and
batch-norm running statistics), the usual guard when a pretrained tower meets a small batch.

A frozen parameter has `requires_grad = False`, so autograd computes no gradient for it, the
optimizer's groups (`train/optim.py`) leave it out and it holds no optimizer state. A fully locked
tower also stays in eval mode while the model trains (no dropout, no batch-norm updates), so it
computes the same features for the same input: that is what lets `FeatureCache` remember them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from coalign.config import TowerSpec
    from coalign.models.encoders.base import Encoder

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


def is_norm(module: nn.Module) -> bool:
    """Layer, group, RMS and batch norms of torch, and the norms of timm and Hugging Face models
    (subclasses of torch's, or classes whose name ends in `Norm`/`Norm2d`, as T5's RMS norm)."""
    name = type(module).__name__
    return isinstance(module, NORMS) or name.endswith(("Norm", "Norm2d", "NormAct2d"))


def frozen_modules(tower: Encoder, spec: TowerSpec) -> list[nn.Module]:
    """The submodules that must stay in eval mode while training: the whole tower when it is locked
    with nothing unlocked, and every norm layer with `freeze_norm`."""
    out: list[nn.Module] = [tower] if spec.lock and not spec.unlock_last else []
    if spec.freeze_norm:
        out += [m for m in tower.modules() if is_norm(m)]
    return out


def apply_lock(tower: Encoder, spec: TowerSpec, where: str) -> None:
    """Set `requires_grad` on the tower's parameters as its spec says (see the module docstring)."""
    if spec.lock:
        tower.requires_grad_(False)
    if spec.unlock_last:
        blocks = tower.lock_blocks()
        if spec.unlock_last > len(blocks):
            raise ValueError(
                f"{where}.unlock_last: {spec.unlock_last} is more than the {len(blocks)} blocks of this "
                f"tower ({type(tower).__name__})"
            )
        for p in trailing_parameters(tower, blocks[-spec.unlock_last :]):
            p.requires_grad_(True)
    if spec.freeze_norm:
        for m in tower.modules():
            if is_norm(m):
                m.requires_grad_(False)


def trailing_parameters(tower: nn.Module, last_blocks: list[nn.Module]) -> list[nn.Parameter]:
    """The parameters of `last_blocks` and every parameter registered after the first of them (the
    final norm, a pooling head): in a tower's registration order, what follows the blocks."""
    first = {id(p) for p in last_blocks[0].parameters()}
    inside = {id(p) for b in last_blocks for p in b.parameters()}
    params = list(tower.parameters())
    start = next((i for i, p in enumerate(params) if id(p) in first), len(params))
    return [p for i, p in enumerate(params) if i >= start or id(p) in inside]


def trainable_count(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    return sum(p.numel() for p in module.parameters() if p.requires_grad), total


class FeatureCache:
    """Remembers a locked tower's (tokens, mask, pooled) per input row, keyed by the row's bytes, so
    training that meets the same caption (or unaugmented image) again skips the tower (APE-style
    training of heads on frozen features). Exact: a locked tower in eval mode is a pure function of
    its input. `max_items` bounds the memory (rows beyond it are computed, not stored)."""

    def __init__(self, max_items: int = 100_000):
        self.max_items = max_items
        self.store: dict[bytes, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}
        self.hits = self.misses = 0

    @staticmethod
    def keys(x: torch.Tensor) -> list[bytes]:
        rows = x.detach().reshape(x.shape[0], -1).cpu().contiguous()
        return [bytes(str(rows.dtype), "ascii") + r.numpy().tobytes() for r in rows]

    def lookup(self, x: torch.Tensor) -> tuple[list[bytes], list[int]]:
        """The keys of x's rows and the indices of the rows not cached yet."""
        keys = self.keys(x)
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        return keys, missing

    def put(self, key: bytes, tokens: torch.Tensor, mask: torch.Tensor | None, pooled: torch.Tensor) -> None:
        if len(self.store) < self.max_items:
            self.store[key] = (tokens, mask, pooled)

    def __len__(self) -> int:
        return len(self.store)
