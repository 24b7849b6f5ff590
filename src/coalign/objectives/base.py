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

from coalign.data.sample import present_rows, select_present
from coalign.models.encoders.base import Tokens
from coalign.models.model import Features, MultimodalModel
from coalign.registry import ConfigError, StrictModel


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

    def hold_model(self, model: nn.Module) -> None:
        """Keep the model for `forward` (`self.model`). It belongs to the Task; object.__setattr__
        keeps nn.Module from registering it a second time here (its weights would appear twice in
        the Task's parameters and state_dict)."""
        object.__setattr__(self, "_model", model)

    @property
    def model(self) -> MultimodalModel:
        model = self.__dict__.get("_model")
        if model is None:
            raise RuntimeError(
                f"{self.name}: call bind(model) before using the objective (Task.from_specs does)"
            )
        return model

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


def paired_tokens(
    features: dict[str, Features], batch: dict[str, Any], a: str, b: str
) -> tuple[Tokens, Tokens]:
    """The token rows of the samples that have both keys, row-aligned (as `paired` does for
    embeddings: each key's features cover only the rows where it is present)."""
    for m in (a, b):
        if m not in features:
            raise KeyError(f"objective needs modality '{m}', but the batch has {sorted(features)}")
    rows_a, rows_b = present_rows(batch, (a, b))
    return take_rows(features[a].tokens, rows_a), take_rows(features[b].tokens, rows_b)


def take_rows(t: Tokens, rows: torch.Tensor | None) -> Tokens:
    """Tokens of the given rows (None: all of them)."""
    if rows is None:
        return t
    rows = rows.to(t.tokens.device)
    return Tokens(t.tokens[rows], None if t.mask is None else t.mask[rows])


class FusedOptions(ObjectiveConfig):
    """Base of the Configs of objectives that read fused tokens (`MultimodalModel.fuse`): the recipe
    loader then requires a `model.fusion` part over exactly these two modalities."""

    needs_fusion: ClassVar[bool] = True
    modalities: tuple[str, str] = ("image", "text")


class FusedObjective(Objective):
    """An objective that calls the model's fusion part; `bind` checks it and keeps the model."""

    def bind(self, model: nn.Module, transforms: dict[str, Any] | None = None) -> None:
        fusion = getattr(model, "fusion", None)
        if fusion is None:
            raise ConfigError(f"{self.name}: the model has no fusion part; add one under model.fusion")
        if set(self.cfg.modalities) != {fusion.query, fusion.context}:
            raise ConfigError(
                f"{self.name}: modalities {list(self.cfg.modalities)} are not the towers the fusion part "
                f"mixes ({fusion.query}, {fusion.context})"
            )
        self.hold_model(model)
