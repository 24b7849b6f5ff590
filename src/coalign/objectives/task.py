"""Task: model + weighted objectives -> named losses. The training loop only ever sums `loss`.

Under torch.distributed (more than one rank) the objectives see the global batch: `loss` gathers
every rank's features first (`objectives/distributed.py`). Objectives that support it compute the
local loss (their terms for this rank's rows against every gathered column); an objective with
`exchanges = True` (SigLIP's ring) is handed this rank's own features and does its own
communication. Every value is then averaged over the ranks, so each rank logs the global loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from coalign.config import ObjectiveSpec, Recipe
from coalign.models.model import Features, MultimodalModel
from coalign.objectives.base import Objective
from coalign.objectives.distributed import as_part, gather_global, mean_over_ranks, world_size
from coalign.registry import OBJECTIVES


class Task(nn.Module):
    def __init__(self, model: MultimodalModel, objectives: list[Objective], weights: list[float]):
        super().__init__()
        if len(objectives) != len(weights):
            raise ValueError("one weight per objective")
        self.model = model
        self.objectives = nn.ModuleList(objectives)
        self.weights = list(weights)

    @classmethod
    def from_specs(
        cls, model: MultimodalModel, specs: list[ObjectiveSpec], transforms: dict | None = None
    ) -> Task:
        objectives = [
            OBJECTIVES.create(s.name, where=f"objectives.{i}", **s.options()) for i, s in enumerate(specs)
        ]
        for objective in objectives:
            objective.bind(model, transforms)
        return cls(model, objectives, [s.weight for s in specs])

    @staticmethod
    def lr_scales(recipe: Recipe) -> dict[str, float]:
        """Parameter-name prefix -> learning-rate multiplier, for the optimizer's groups: each
        objective's own parameters (`objectives.N.lr_scale`) and each tower's
        (`model.towers.<name>.lr_scale`; its head keeps the base rate)."""
        towers = {f"model.towers.{m}.": t.lr_scale for m, t in recipe.model.towers.items()}
        objectives = {f"objectives.{i}.": s.lr_scale for i, s in enumerate(recipe.objectives)}
        return {prefix: s for prefix, s in (towers | objectives).items() if s != 1.0}

    def after_step(self, step: int) -> None:
        """Called by the loop after each optimizer step, `step` the number of steps taken with this
        one (1 after the first): objectives that keep state derived from the weights (a momentum
        model, an EMA teacher) update it here, through their own `after_step(step)`; a schedule
        (data2vec's rising decay) is a function of `step`, which resume restores."""
        for objective in self.objectives:
            hook = getattr(objective, "after_step", None)
            if hook is not None:
                hook(step)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{"loss": weighted sum, "<name>_loss": each loss, "<name>/<metric>": each metric}."""
        return self.loss(self.model(batch), batch)

    def loss(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The objectives on features already computed (GradCache computes them in pieces); with
        several ranks, on the global batch."""
        spread = world_size() > 1
        gathered, own = (features, batch), (features, as_part(batch) if spread else batch)
        if spread and not all(getattr(o, "exchanges", False) for o in self.objectives):
            inputs = any(getattr(o, "needs_inputs", False) for o in self.objectives)
            gathered = gather_global(features, batch, inputs=inputs)
        out: dict[str, torch.Tensor] = {}
        total = None
        for objective, weight in zip(self.objectives, self.weights, strict=True):
            seen = own if getattr(objective, "exchanges", False) else gathered
            for key, value in objective(*seen).items():
                if key.endswith("_loss"):
                    if key in out:
                        raise ValueError(f"two objectives both return '{key}'; give them distinct names")
                    out[key] = value
                    total = weight * value if total is None else total + weight * value
                else:
                    out[f"{objective.name}/{key}"] = value
        out["loss"] = total
        return mean_over_ranks(out) if spread else out
