"""Training and evaluation when samples lack some modalities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coalign.build import build_model, build_source, build_transforms, prepare_transforms
from coalign.config import load_recipe
from coalign.data.loader import train_batches
from coalign.data.transforms.base import Pipeline
from coalign.objectives.task import Task
from coalign.registry import ConfigError


def tiny_trimodal(*overrides):
    base = ["data.train.size=64", "data.eval.heldout_samples.size=16", "data.batch_size=16"]
    return load_recipe("trimodal", [*base, *overrides], smoke=True)


def test_drop_modalities_is_random_per_sample_and_seeded():
    pipeline = Pipeline({"a": lambda v, rng: v, "a@v": lambda v, rng: v, "b": lambda v, rng: v}, {"a": 0.5})
    kept = [("a" in pipeline({"a": 1, "b": 2}, np.random.default_rng(i))) for i in range(400)]
    assert 0.4 < np.mean(kept) < 0.6
    again = [("a" in pipeline({"a": 1, "b": 2}, np.random.default_rng(i))) for i in range(400)]
    assert kept == again
    out = pipeline({"a": 1, "b": 2}, np.random.default_rng(kept.index(False)))
    assert out == {"b": 2}  # a view goes with its modality


def test_drop_modalities_names_a_tower_and_a_probability():
    with pytest.raises(ConfigError, match="data.drop_modalities.audio: the model has no 'audio' tower"):
        tiny_trimodal("data.drop_modalities={audio: 0.5}")
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        tiny_trimodal("data.drop_modalities={points: 1.0}")


@pytest.mark.slow
def test_a_few_steps_on_batches_with_missing_modalities(tmp_path):
    torch.manual_seed(0)
    recipe = tiny_trimodal("data.drop_modalities={points: 0.5, image: 0.3}")
    source = build_source(recipe.data.train, "data.train")
    transforms = build_transforms(recipe)
    prepare_transforms(transforms, source, tmp_path, resume=False)
    task = Task.from_specs(build_model(recipe, transforms), recipe.objectives, transforms)
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-3)
    batches = train_batches(source, Pipeline(transforms, recipe.data.drop_modalities), 16, 0, 0)
    points = task.model.towers["points"]
    before = [p.detach().clone() for p in points.parameters()]
    for _ in range(3):
        batch = next(batches)
        present = batch["present"]
        assert not bool(present["points"].all()) and bool(present["points"].any())
        assert batch["points"].shape[0] == int(present["points"].sum())  # only the rows that have points
        out = task(batch)
        assert math.isfinite(out["loss"].item())
        assert {"pair/image-points", "pair/points-text"} <= {k.split("all_pairs/")[-1] for k in out}
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, points.parameters(), strict=True))
