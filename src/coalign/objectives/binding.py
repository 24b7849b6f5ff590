"""Binding three or more modalities with pairwise InfoNCE terms: anchored and all pairs.

Both sum CLIP's symmetric InfoNCE (`contrastive.info_nce`) over a set of modality pairs, with one
learnable temperature shared by every pair:

- `anchored` (ImageBind, Girdhar et al. 2023; ULIP, Xue et al. 2023): every modality is contrasted
  with one anchor modality only, L = reduce_m InfoNCE(anchor, m). The other modalities meet each
  other only through the anchor ("emergent" alignment), so pairs never seen together still land in
  one space.
- `all_pairs` (VATT, Akbari et al. 2021, which sums its video-audio and video-text NCE terms; the
  CLIP baseline of Symile, Saporta et al. 2024): L = reduce_{a<b} InfoNCE(a, b) over every pair.

`reduction: mean` (default) divides by the number of pairs that ran, so the loss keeps CLIP's scale
whatever the number of modalities; `sum` is the papers' plain sum.

Missing modalities: each pair uses only the samples that have both of its modalities (`paired`),
so a sample without audio still trains its image-text pair. A pair with fewer than 2 such samples
has no negative to contrast with and is left out of the reduction (its per-pair metric is then
absent). When every pair is left out, the loss is a zero that stays attached to the embeddings and
the temperature, so backward, DDP and the optimizer see the same parameters as in any other step.

Under several ranks each pair's InfoNCE is the local loss (`contrastive.info_nce` with `Rows`); which
pairs run is decided on the global batch, so every rank reduces over the same pairs.

`BindingOptions` / `BindingObjective` here are also the base of `symile` and `gram`.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

import pydantic
import torch
from torch import nn

from coalign.data.sample import base_modality
from coalign.models.model import Features
from coalign.objectives.base import LearnedScale, Objective, TemperatureOptions, paired
from coalign.objectives.contrastive import info_nce
from coalign.objectives.distributed import own_rows
from coalign.registry import OBJECTIVES, ConfigError


class BindingOptions(TemperatureOptions):
    # The modalities (batch keys) to bind; None: every modality of the model found in the batch
    # (views `<modality>@<view>` are only used when named here).
    modalities: list[str] | None = None

    @classmethod
    def tiny(cls) -> dict:
        return {"modalities": ["image", "text", "points"]}  # three: a joint term needs more than a pair

    @pydantic.field_validator("modalities")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if len(value) < 2:
            raise ValueError(f"name at least two modalities to bind, got {value}")
        repeated = sorted({m for m in value if value.count(m) > 1})
        if repeated:
            raise ValueError(f"each modality may appear once, got {repeated} more than once in {value}")
        return value


class AnchorOptions(BindingOptions):
    batch_key_fields = ("modalities", "anchor")

    anchor: str = "image"

    @pydantic.model_validator(mode="after")
    def _anchor_is_bound(self) -> AnchorOptions:
        if self.modalities is not None and self.anchor not in self.modalities:
            raise ValueError(
                f"anchor '{self.anchor}' must be one of modalities {self.modalities} "
                "(modalities lists every modality bound, the anchor included)"
            )
        return self


class PairwiseOptions(BindingOptions):
    reduction: Literal["mean", "sum"] = "mean"  # over the pairs that ran


class AnchoredConfig(PairwiseOptions, AnchorOptions):
    pass


class AllPairsConfig(PairwiseOptions):
    pass


def attached_zero(scale: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """0, as a function of `scale` and every tensor: the loss of a batch with nothing to contrast.

    A bare `torch.zeros(())` would leave backward without a graph (an error when it is the only
    loss) and leave parameters unused this step (an error under DDP's default settings)."""
    zero = scale * 0.0
    for t in tensors:
        zero = zero + t.sum() * 0.0
    return zero


def check_single(name: str, key: str, x: torch.Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(
            f"objective '{name}' needs one embedding per sample (B, E) for '{key}', got {tuple(x.shape)}; "
            "group inputs (several items per sample) are not supported here"
        )


class BindingObjective(LearnedScale, Objective):
    """Shared by the binding objectives: the learnable temperature, which modalities to bind, and the
    check (at bind time) that every named modality has a tower."""

    def __init__(self, cfg: BindingOptions | None = None, **kwargs: Any):
        super().__init__(cfg, **kwargs)
        self.init_scale(1.0 / self.cfg.init_temperature, self.cfg.max_logit_scale, self.cfg.learn_temperature)

    def named(self) -> list[str]:
        """The modalities the config names (the anchor included), for the bind-time check."""
        names = list(self.cfg.modalities or [])
        anchor = getattr(self.cfg, "anchor", None)
        return names if anchor is None or anchor in names else [*names, anchor]

    def bind(self, model: nn.Module, transforms: dict[str, Any] | None = None) -> None:
        towers = getattr(model, "towers", None)
        if towers is None:
            return
        missing = [m for m in self.named() if base_modality(m) not in towers]
        if missing:
            raise ConfigError(
                f"objective '{self.name}': the model has no tower for {missing}; towers: {', '.join(towers)}"
            )

    def bound(self, features: dict[str, Features]) -> list[str]:
        """The modalities to bind in this batch: the named ones the batch has (in the config's order),
        or, with `modalities: None`, every plain modality key of the batch (sorted, so the order and
        the per-pair metric names do not depend on the batch)."""
        if self.cfg.modalities is None:
            return sorted(k for k in features if "@" not in k)
        return [m for m in self.cfg.modalities if m in features]

    def joint(self, features: dict[str, Features]) -> list[str] | None:
        """The modalities of a single joint term (symile, gram): the named ones, or every plain
        modality of the batch with `modalities: None`; None when a named one has no sample here
        (then no sample has them all)."""
        if self.cfg.modalities is None:
            return self.bound(features)
        return None if any(m not in features for m in self.cfg.modalities) else list(self.cfg.modalities)

    def zero(self, scale: torch.Tensor, features: dict[str, Features], keys: list[str]) -> torch.Tensor:
        return attached_zero(scale, [features[k].embedding for k in keys if k in features])


def pairwise_loss(
    features: dict[str, Features],
    batch: dict[str, Any],
    pairs: list[tuple[str, str]],
    scale: torch.Tensor,
    name: str,
) -> dict[tuple[str, str], torch.Tensor]:
    """InfoNCE of each pair over the samples that have both; pairs with < 2 such samples are left out."""
    terms = {}
    for a, b in pairs:
        xa, xb = paired(features, batch, a, b)  # (M, E), (M, E)
        check_single(name, a, xa)
        check_single(name, b, xb)
        if xa.shape[0] >= 2:
            terms[(a, b)] = info_nce(xa, xb, scale, own_rows(batch, (a, b), xa.shape[0]))
    return terms


class PairwiseBinding(BindingObjective):
    def pairs(self, modalities: list[str]) -> list[tuple[str, str]]:
        raise NotImplementedError

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        modalities = self.bound(features)
        scale = self.scale()
        terms = pairwise_loss(features, batch, self.pairs(modalities), scale, self.name)
        if terms:
            loss = torch.stack(list(terms.values())).sum()
            if self.cfg.reduction == "mean":
                loss = loss / len(terms)
        else:
            loss = self.zero(scale, features, modalities)
        out = {f"{self.name}_loss": loss, "logit_scale": scale.detach()}
        out.update({f"pair/{a}-{b}": t.detach() for (a, b), t in terms.items()})
        return out


@OBJECTIVES.register("anchored")
class Anchored(PairwiseBinding):
    """InfoNCE between the anchor and each other modality (ImageBind, ULIP)."""

    Config = AnchoredConfig
    name = "anchored"

    def pairs(self, modalities: list[str]) -> list[tuple[str, str]]:
        anchor = self.cfg.anchor
        if anchor not in modalities:
            return []  # no sample of this batch has the anchor: nothing to bind through
        return [(anchor, m) for m in modalities if m != anchor]


@OBJECTIVES.register("all_pairs")
class AllPairs(PairwiseBinding):
    """InfoNCE between every pair of modalities (VATT; pairwise CLIP)."""

    Config = AllPairsConfig
    name = "all_pairs"

    def pairs(self, modalities: list[str]) -> list[tuple[str, str]]:
        return list(itertools.combinations(modalities, 2))
