"""The objective contract: a registered nn.Module, `objective(features, batch) -> {"<name>_loss": t, ...}`.

Every key ending in `_loss` is summed (with the objective's weight) by the Task; every other key is
a metric that is logged under the objective's name (for example a learnt temperature).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import pydantic
import torch
from torch import nn

from coalign.data.sample import select_present
from coalign.models.model import Features
from coalign.registry import StrictModel


class ObjectiveConfig(StrictModel):
    """Base of every objective's Config.

    `batch_key_fields` names the fields that hold batch keys (modalities, or views
    `<modality>@<view>`): the recipe loader checks at load that each is a key of `data.transforms`,
    since the batch holds exactly those. Otherwise the mistake shows at the first step, or never (a
    binding objective quietly skips a key that no sample has).
    """

    batch_key_fields: ClassVar[tuple[str, ...]] = ("modalities",)

    def batch_keys(self) -> dict[str, list[str]]:
        """field -> the batch keys it names (empty when the field defers to the batch, as None does)."""
        out = {}
        for field in self.batch_key_fields:
            value = getattr(self, field)
            out[field] = [value] if isinstance(value, str) else list(value or [])
        return out

    @pydantic.field_validator("modalities", check_fields=False)
    @classmethod
    def _distinct(cls, value: Sequence[str] | None) -> Sequence[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"the modalities must differ, got {list(value)}")
        return value


class TemperatureOptions(ObjectiveConfig):
    """CLIP's learnable temperature, shared by every objective that scales cosine similarities."""

    init_temperature: float = pydantic.Field(0.07, gt=0)  # the logit scale starts at 1 / 0.07
    max_logit_scale: float = pydantic.Field(100.0, gt=0)  # CLIP clamps the scale at 100
    learn_temperature: bool = True


class LearnedScale:
    """Mixin: a parameter `logit_scale` = ln(scale), as CLIP and OpenCLIP store it (the optimiser then
    works on a log scale); `scale()` clamps at ln(max_scale) in the forward pass, not in place."""

    def init_scale(self, init_scale: float, max_scale: float, learn: bool) -> None:
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)), requires_grad=learn)
        self._max_log_scale = math.log(max_scale)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self._max_log_scale).exp()


class Objective(nn.Module):
    name: str = "objective"
    Config: type[StrictModel] | None = None
    needs_inputs: bool = False  # reads batch tensors beside the features (a teacher re-encodes them)

    def __init__(self, cfg: StrictModel | None = None, **kwargs: Any):
        """Objectives take their validated Config (from the registry) or its fields as keywords."""
        super().__init__()
        if self.Config is not None:
            self.cfg = cfg if cfg is not None else self.Config(**kwargs)

    def bind(self, model: nn.Module, transforms: dict[str, Any] | None = None) -> None:
        """Called once before the optimizer is built, with the model (to create heads that need its
        widths) and the training transforms (to check that a teacher reads the same inputs)."""

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def paired(
    features: dict[str, Features], batch: dict[str, Any], a: str, b: str, field: str = "embedding"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`field` of keys a and b for the samples that have both, row-aligned: (M, ...), (M, ...)."""
    xa, xb = aligned(features, batch, (a, b), field)
    return xa, xb


def aligned(
    features: dict[str, Features],
    batch: dict[str, Any],
    keys: Sequence[str],
    field: str = "embedding",
) -> tuple[torch.Tensor, ...]:
    """`field` of each key for the samples that have all keys, row-aligned: one (M, ...) per key.

    Each key's features cover only the rows that have it (`batch["present"][key]`); the selection is
    `sample.select_present`, the one helper for "rows present in every key"."""
    for m in keys:
        if m not in features:
            raise KeyError(f"objective needs modality '{m}', but the batch has {sorted(features)}")
    return select_present(batch, keys, [getattr(features[m], field) for m in keys])
