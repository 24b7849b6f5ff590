"""Intra-modal contrast between two augmented views of each sample: SLIP's image SSL term (SimCLR's
NT-Xent, Chen et al. 2020; Mu et al. 2022) and TCL's text term (Yang et al. 2022).

The views are batch keys `<modality>@<view>` that the data pipeline makes from the same raw value
with their own augmentation (random crops for images, token dropout for captions); the model encodes
them with the modality's tower. One class serves both papers; `tcl_text` only changes the defaults.

Local loss (several ranks): the anchors are this rank's rows of both views, against all 2M views.
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from coalign.data.sample import base_modality
from coalign.models.model import Features
from coalign.objectives.base import Objective, ObjectiveConfig, paired
from coalign.objectives.distributed import Rows, own_rows
from coalign.registry import OBJECTIVES, ConfigError


class SimCLRConfig(ObjectiveConfig):
    batch_key_fields = ("views",)

    views: tuple[str, str] = ("image@v1", "image@v2")  # two batch keys of one modality
    loss_name: str = pydantic.Field("simclr", pattern=r"^[a-z][a-z0-9_]*$")  # returns {loss_name}_loss
    temperature: float = pydantic.Field(0.1, gt=0)  # fixed, as SLIP
    # own: a fresh MLP on the tower's pooled features (SLIP); shared: the CLIP projection head's
    # embedding, so the intra-modal term shapes the same space as the cross-modal one (TCL).
    head: Literal["own", "shared"] = "own"
    head_hidden: int = pydantic.Field(4096, gt=0)  # SLIP: 4096
    head_dim: int = pydantic.Field(256, gt=0)  # SLIP: 256

    @classmethod
    def tiny(cls) -> dict:
        return {"head_hidden": 32, "head_dim": 16}

    @pydantic.field_validator("views")
    @classmethod
    def _two_views_of_one_modality(cls, views: tuple[str, str]) -> tuple[str, str]:
        a, b = views
        if a == b:
            raise ValueError(f"views must be two different batch keys, got '{a}' twice")
        if base_modality(a) != base_modality(b):
            raise ValueError(
                f"views must be two views of one modality (e.g. image@v1, image@v2), got '{a}' and '{b}'"
            )
        return views


class TCLTextConfig(SimCLRConfig):
    views: tuple[str, str] = ("text@v1", "text@v2")
    loss_name: str = pydantic.Field("tcl_text", pattern=r"^[a-z][a-z0-9_]*$")
    temperature: float = pydantic.Field(0.07, gt=0)  # TCL's (learnt) temperature starts at 0.07
    head: Literal["own", "shared"] = "shared"


def _nt_xent_logits(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float | torch.Tensor, rows: Rows | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (2B, 2B) with self-similarity masked out, and each row's positive column (2B,). With
    `rows` (the local loss), the anchors are those rows of both views: (2m, 2B) and (2m,)."""
    B = z1.shape[0]
    rows = rows or Rows.every(B)
    idx = rows.index(z1.device)
    anchors = torch.cat([idx, idx + B])  # (2m,) rows of z: this rank's rows of view 1, then of view 2
    # At least float32, autocast off: bf16 cosines (8-bit mantissa) divided by 0.1 blur the logits.
    z = torch.cat([z1, z2]).to(torch.promote_types(z1.dtype, torch.float32))
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = F.normalize(z, dim=-1)  # (2B, E)
        mine = z if rows.count == B else z[anchors]
        logits = mine @ z.T / temperature  # (2m, 2B)
    self_mask = anchors[:, None] == torch.arange(2 * B, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))  # a view is not its own negative
    target = torch.cat([idx + B, idx])  # view i of sample k pairs with the other view of sample k
    return logits, target


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float | torch.Tensor, rows: Rows | None = None
) -> torch.Tensor:
    """NT-Xent over 2B views: z1, z2 (B, E) are two views of the same B samples (normalised here).

    For each of the 2B views the positive is the other view of its sample and the negatives are the
    other 2B - 2 views; the loss is the mean cross-entropy over the 2B anchors (with `rows`, the
    local loss of those rows' anchors, see `Rows.mean`).
    """
    rows = rows or Rows.every(z1.shape[0])
    logits, target = _nt_xent_logits(z1, z2, temperature, rows)
    return rows.mean(F.cross_entropy(logits, target, reduction="none"), total=2 * z1.shape[0])


def projection_mlp(width: int, hidden: int, out: int) -> nn.Sequential:
    """SLIP's image_mlp: (Linear, BatchNorm, ReLU) x 2, then Linear to the SSL space."""
    return nn.Sequential(
        nn.Linear(width, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out),
    )


def aligned_views(
    features: dict[str, Features], batch: dict[str, Any], a: str, b: str, field: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`field` ("pooled" or "embedding") of views a and b for the samples that have both: (M, *), (M, *).

    `base.paired` with a message that says how to add a missing view to the recipe.
    """
    missing = [k for k in (a, b) if k not in features]
    if missing:
        raise ConfigError(
            f"intra-modal objective needs views {missing}, but the batch has {sorted(features)}; "
            f"add them to the recipe as data.transforms.<modality>@<view> "
            f"(e.g. data.transforms.{missing[0]}: {{transform: ...}})"
        )
    return paired(features, batch, a, b, field)


@OBJECTIVES.register("simclr")
class SimCLR(Objective):
    """NT-Xent between two views of each sample; `loss_name` keeps several instances apart."""

    Config = SimCLRConfig

    def __init__(self, cfg: SimCLRConfig | None = None, **kwargs: Any):
        super().__init__(cfg, **kwargs)
        self.name = self.cfg.loss_name  # metrics are logged as "<loss_name>/<metric>"
        self.head: nn.Module | None = None

    def bind(self, model: nn.Module, transforms: dict | None = None) -> None:
        base = base_modality(self.cfg.views[0])
        if base not in model.towers:
            raise ConfigError(
                f"objective '{self.name}': views {list(self.cfg.views)} need a '{base}' tower; "
                f"towers: {', '.join(model.towers)}"
            )
        if self.cfg.head == "own":
            self.head = projection_mlp(model.towers[base].width, self.cfg.head_hidden, self.cfg.head_dim)

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        own = self.cfg.head == "own"
        if own and self.head is None:
            raise RuntimeError(f"objective '{self.name}' has no head yet: call bind(model) first")
        x1, x2 = aligned_views(features, batch, *self.cfg.views, field="pooled" if own else "embedding")
        key = f"{self.cfg.loss_name}_loss"
        if x1.shape[0] == 0:  # no sample has both views: a zero that still reaches every parameter
            zero = x1.sum() + x2.sum() + sum(p.sum() for p in self.parameters())
            return {key: zero * 0.0}
        if own:
            # One pass over both views (2M rows) so BatchNorm sees at least two rows even when M = 1.
            z = self.head(torch.cat([x1, x2]))  # (2M, head_dim)
            x1, x2 = z.chunk(2)
        rows = own_rows(batch, self.cfg.views, x1.shape[0])
        logits, target = _nt_xent_logits(x1, x2, self.cfg.temperature, rows)
        loss = rows.mean(F.cross_entropy(logits, target, reduction="none"), total=2 * x1.shape[0])
        with torch.no_grad():  # is the other view the top match?
            accuracy = rows.mean((logits.argmax(dim=1) == target).float(), total=2 * x1.shape[0])
        return {key: loss, "accuracy": accuracy}


@OBJECTIVES.register("tcl_text")
class TCLText(SimCLR):
    """TCL's intra-modal text term: two token-dropout views of each caption, contrasted in the shared
    (CLIP) embedding space. TCL draws negatives from a momentum queue; this in-batch form is SimCLR's."""

    Config = TCLTextConfig
