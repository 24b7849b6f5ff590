"""AdamW with no weight decay on gains, biases and the temperature; cosine schedule with warmup."""

from __future__ import annotations

import math

import torch
from torch import nn

from coalign.config import TrainConfig


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; vectors and scalars (LayerNorm gains, biases, logit scales) do not, as in CLIP."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(module, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=True
    )


def cosine_with_warmup(steps: int, warmup: int, min_ratio: float = 0.0):
    """Multiplier of the base learning rate at step s: linear warmup, then cosine to min_ratio."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
    )
