"""Every recipe in recipes/ trains with --smoke (so a new recipe is tested the day it is added)."""

import json
import math

import pytest

from coalign.config import load_recipe, recipes_dir
from coalign.train.loop import train

RECIPES = sorted(p.stem for p in recipes_dir().glob("*.yaml"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny trained run for recipes that distil from a teacher checkpoint."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    train(load_recipe("demo", ["train.steps=2"], smoke=True), out, progress=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_with_smoke(name, tmp_path, request):
    overrides = ["train.steps=3", "train.log_every=1"]
    raw = load_recipe(name, overrides, smoke=True)
    for i, spec in enumerate(raw.objectives):
        if "teacher" in spec.options():  # point at a real tiny teacher and share its tokenizer
            run = request.getfixturevalue("teacher")
            overrides += [
                f"objectives.{i}.teacher={run}",
                f"data.transforms.text.path={run / 'tokenizer.json'}",
            ]
    recipe = load_recipe(name, overrides, smoke=True)
    result = train(recipe, tmp_path / "run", progress=False)
    assert result.step == 3
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in logged if row["kind"] == "train"]
    losses = {k for row in train_rows for k in row if k.endswith("_loss")}
    assert len(losses) >= len(recipe.objectives), f"each objective logs its loss by name: {losses}"
    assert all(math.isfinite(row["loss"]) for row in train_rows)
    assert result.results, "the run ends with an evaluation"
