"""Symmetric InfoNCE between two modalities with a learnable temperature (CLIP, ALIGN)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coalign.models.model import Features
from coalign.objectives.base import Objective, paired
from coalign.registry import OBJECTIVES, StrictModel


class InfoNCEConfig(StrictModel):
    modalities: tuple[str, str] = ("image", "text")
    init_temperature: float = 0.07  # logit scale starts at ln(1 / 0.07)
    max_logit_scale: float = 100.0  # CLIP clamps the scale at 100
    learn_temperature: bool = True


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Mean of the a->b and b->a cross-entropies over in-batch pairs; a, b: (B, E) normalised."""
    logits = logit_scale * a @ b.T  # (B, B); row i's positive is column i
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@OBJECTIVES.register("clip")
class InfoNCE(Objective):
    Config = InfoNCEConfig
    name = "clip"

    def __init__(self, cfg: InfoNCEConfig | None = None, **kwargs: Any):
        super().__init__()
        self.cfg = cfg or InfoNCEConfig(**kwargs)
        init = torch.tensor(math.log(1.0 / self.cfg.init_temperature))
        self.logit_scale = nn.Parameter(init, requires_grad=self.cfg.learn_temperature)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        a, b = paired(features, batch, *self.cfg.modalities)
        scale = self.scale()
        return {"clip_loss": info_nce(a, b, scale), "logit_scale": scale.detach()}
