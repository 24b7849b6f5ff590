"""Fault injection: every wrong setting is a one-line error at load, before the run folder exists.

Each case runs the real command line (`coalign train RECIPE OVERRIDES --smoke --out TMP/run`) and
expects exit code 2, exactly one stderr line `coalign train: error: ...` naming the offending field,
and no run folder. `train()` is replaced by a stub that fails the test if it is ever reached, so a
mistake caught only once training has started counts as a miss, and no case trains anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import coalign.train.loop
from coalign.cli import main
from coalign.config import load_recipe, recipes_dir

FOLDER = "<a folder>"  # the recipe argument is a folder
BROKEN_YAML = "name: demo\ndata:\n  train: {source: world\n  batch_size: 4\n"  # unclosed flow mapping
LIST_YAML = "- name: demo\n- data: {}\n"


def case(*overrides: str, field: str, id: str, recipe: str = "demo"):
    """One invalid recipe: `recipe` is a built-in name, FOLDER, or YAML text written to a file."""
    return pytest.param(recipe, list(overrides), field, id=id)


CASES = [
    # ---- issue #10 point 6: accepted today, or a traceback today, or caught after the run folder exists
    case("data.batch_size=1", field="data.batch_size", id="batch-size-1"),
    case("train.grad_clip=-1", field="train.grad_clip", id="grad-clip-negative"),
    case("train.grad_clip=0", field="train.grad_clip", id="grad-clip-zero"),
    case("objectives.0.weight=0", field="objectives.0.weight", id="weight-zero"),
    case("objectives.0.weight=-1", field="objectives.0.weight", id="weight-negative"),
    case("model.towers.image.depth=0", field="model.towers.image.depth", id="vit-depth-0"),
    case("model.towers.text.depth=0", field="model.towers.text.depth", id="text-depth-0"),
    case("data.transforms.text.vocab_size=0", field="data.transforms.text.vocab_size", id="bpe-vocab-0"),
    case("model.towers.text.vocab_size=0", field="model.towers.text.vocab_size", id="encoder-vocab-0"),
    case("data.eval.heldout_samples.size=0", field="data.eval.heldout_samples.size", id="eval-size-0"),
    case(recipe=BROKEN_YAML, field="line 4", id="yaml-syntax-in-recipe"),
    case("train.steps=[1", field="train.steps", id="yaml-syntax-in-override"),
    case("train.steps.x=1", field="train.steps", id="override-into-a-scalar"),
    case(recipe=FOLDER, field="is a folder", id="recipe-is-a-folder"),
    case("model.towers.image.width=-32", field="model.towers.image.width", id="width-negative"),
    case("train.threads=-1", field="train.threads", id="threads-negative"),
    case("train.threads=0", field="train.threads", id="threads-zero"),
    case("objectives.0.modalities=[image,audio]", field="objectives.0.modalities", id="objective-no-tower"),
    case("data.transforms.text.context_length=0", field="data.transforms.text.context_length", id="ctx-0"),
    case("data.transforms.text.context_length=1", field="data.transforms.text.context_length", id="ctx-1"),
    case("data.transforms.image.size=0", field="data.transforms.image.size", id="image-size-0"),
    # ---- unknown keys at every level
    case("trian.steps=5", field="trian", id="unknown-top-level"),
    case("data.batchsize=4", field="data.batchsize", id="unknown-in-data"),
    case("model.embed=64", field="model.embed", id="unknown-in-model"),
    case("train.stpes=5", field="train.stpes", id="unknown-in-train"),
    case("eval.max_sample=3", field="eval.max_sample", id="unknown-in-eval"),
    case("model.towers.image.depht=3", field="model.towers.image.depht", id="unknown-in-encoder"),
    case("data.transforms.image.sise=32", field="data.transforms.image.sise", id="unknown-in-transform"),
    case("data.train.sise=10", field="data.train.sise", id="unknown-in-source"),
    case("objectives.0.temprature=0.1", field="objectives.0.temprature", id="unknown-in-objective"),
    case("eval.evaluators=[{name: knn, kk: 3}]", field="eval.evaluators.0.kk", id="unknown-in-evaluator"),
    # ---- unknown registry names
    case("model.towers.image.encoder=resnet", field="model.towers.image", id="unknown-encoder"),
    case("objectives.0.name=clipp", field="objectives.0", id="unknown-objective"),
    case("data.train.source=wrld", field="data.train", id="unknown-source"),
    case("data.transforms.image.transform=img", field="data.transforms.image", id="unknown-transform"),
    case("model.head=mlpp", field="model.head", id="unknown-head"),
    case("eval.evaluators=[zero_shott]", field="eval.evaluators.0", id="unknown-evaluator"),
    # ---- wrong types and shapes
    case("train.steps=abc", field="train.steps", id="steps-not-int"),
    case("train.lr=fast", field="train.lr", id="lr-not-float"),
    case("data.batch_size=2.5", field="data.batch_size", id="batch-size-fraction"),
    case("seed=abc", field="seed", id="seed-not-int"),
    case("data.train=world", field="data.train", id="section-as-scalar"),
    case("model.towers.text.causal=maybe", field="model.towers.text.causal", id="bool-not-bool"),
    case("train.betas=[0.9]", field="train.betas", id="betas-one-value"),
    case("train.steps", field="train.steps", id="override-without-equals"),
    case("objectives.3.weight=1", field="objectives.3", id="override-list-index"),
    case(recipe=LIST_YAML, field="YAML mapping", id="recipe-not-a-mapping"),
    # ---- values out of range
    case("train.lr=0", field="train.lr", id="lr-zero"),
    case("train.lr=-0.001", field="train.lr", id="lr-negative"),
    case("train.min_lr_ratio=1.5", field="train.min_lr_ratio", id="min-lr-ratio-above-1"),
    case("train.betas=[0.9,1.0]", field="train.betas", id="beta2-one"),
    case("train.betas=[-0.1,0.98]", field="train.betas", id="beta1-negative"),
    case("train.eps=0", field="train.eps", id="adam-eps-zero"),
    case("train.steps=0", field="train.steps", id="steps-zero"),
    case("objectives.0.lr_scale=0", field="objectives.0.lr_scale", id="lr-scale-zero"),
    case("model.towers.text.lr_scale=-1", field="model.towers.text.lr_scale", id="tower-lr-scale-negative"),
    case("objectives=[]", field="objectives", id="no-objectives"),
    case("model.towers={}", field="model.towers", id="no-towers"),
    case("model.embed_dim=0", field="model.embed_dim", id="embed-dim-zero"),
    case("eval.max_samples=0", field="eval.max_samples", id="eval-max-samples-zero"),
    case("data.train.size=0", field="data.train.size", id="train-size-zero"),
    case("data.train.captions=0", field="data.train.captions", id="world-captions-zero"),
    case("data.train.partial_caption_prob=1.5", field="data.train.partial_caption_prob", id="world-prob"),
    case("data.train.image_size=0", field="data.train.image_size", id="world-image-size-zero"),
    case("data.train.split=val", field="data.train.split", id="world-unknown-split"),
    case("data.transforms.text.fit_samples=0", field="data.transforms.text.fit_samples", id="fit-samples-0"),
    case("data.transforms.image.std=[0.2,0,0.2]", field="data.transforms.image.std", id="image-std-zero"),
    case("data.transforms.image.crop_scale=[0,1]", field="data.transforms.image.crop_scale", id="crop-zero"),
    case(
        "data.transforms.image.crop_scale=[0.9,0.5]",
        field="data.transforms.image.crop_scale",
        id="crop-order",
    ),
    case("model.towers.image.dropout=1.5", field="model.towers.image.dropout", id="dropout-above-1"),
    case("model.towers.text.mlp_ratio=0", field="model.towers.text.mlp_ratio", id="mlp-ratio-zero"),
    case("data.drop_modalities={image: 1.0}", field="data.drop_modalities", id="drop-prob-one"),
    case("data.drop_modalities={text: -0.1}", field="data.drop_modalities", id="drop-prob-negative"),
    # ---- parts that do not fit each other
    case("model.towers.image.heads=3", field="model.towers.image.heads", id="vit-width-heads"),
    case("model.towers.text.heads=5", field="model.towers.text.heads", id="text-width-heads"),
    case(
        "model.towers.image.patch_size=12", field="model.towers.image.patch_size", id="conv-stem-power-of-2"
    ),
    case(
        "model.towers.image.stem=patch",
        "model.towers.image.patch_size=24",
        field="model.towers.image.patch_size",
        id="patch-does-not-divide-image",
    ),
    case("data.transforms.image.size=40", field="data.transforms.image", id="image-size-not-patch-multiple"),
    case(
        "model.towers.text.context_length=8", field="model.towers.text.context_length", id="ctx-below-tokens"
    ),
    case("model.towers.image.image_size=32", field="model.towers.image.image_size", id="vit-size-mismatch"),
    case("data.transforms.audio@v1={transform: audio}", field="data.transforms.audio@v1", id="view-no-tower"),
    case("data.drop_modalities={audio: 0.5}", field="data.drop_modalities.audio", id="drop-no-tower"),
    case("eval.evaluators=[zero_shot,zero_shot]", field="eval.evaluators.1", id="evaluator-twice"),
    case("objectives.0.modalities=[image,image]", field="objectives.0.modalities", id="objective-same-twice"),
    case("objectives.0.modalities=[image,text@all]", field="objectives.0.modalities", id="objective-no-view"),
    case("objectives.1={name: simclr}", field="objectives.1.views", id="simclr-views-missing"),
    case("objectives.0={name: anchored, anchor: audio}", field="objectives.0.anchor", id="anchor-no-tower"),
]


@pytest.fixture
def no_training(monkeypatch):
    """Reaching train() means the mistake got past validation: fail, without training anything."""

    def reached(*args, **kwargs):
        raise AssertionError("train() was reached: the mistake was not caught at load")

    monkeypatch.setattr(coalign.train.loop, "train", reached)
    monkeypatch.delenv("COALIGN_DEBUG", raising=False)


def recipe_argument(recipe: str, tmp_path: Path) -> str:
    if recipe == FOLDER:
        folder = tmp_path / "recipes"
        folder.mkdir()
        return str(folder)
    if "\n" in recipe:
        path = tmp_path / "recipe.yaml"
        path.write_text(recipe)
        return str(path)
    return recipe


def assert_one_line_error(err: str, field: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("coalign train: error: "), lines[0]
    assert field in lines[0], f"'{field}' not named in: {lines[0]}"
    return lines[0]


@pytest.mark.parametrize("recipe, overrides, field", CASES)
def test_invalid_recipe_is_one_line_before_any_work(recipe, overrides, field, tmp_path, capsys, no_training):
    out = tmp_path / "run"
    argv = ["train", recipe_argument(recipe, tmp_path), *_appended(overrides), "--smoke", "--out", str(out)]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert_one_line_error(captured.err, field)
    assert not out.exists()


def _appended(overrides: list[str]) -> list[str]:
    """`objectives.1=...` adds a second objective to the demo's one (an override past the end of a
    list is an error, so the case first makes room with a copy of objective 0)."""
    if any(o.startswith("objectives.1=") for o in overrides):
        return ["objectives=[{name: clip}, {name: clip}]", *overrides]
    return overrides


def test_the_table_is_large_enough():
    assert len(CASES) >= 40


SUBPROCESS = ["train.steps.x=1", "train.steps=[1", "objectives.0.modalities=[image,audio]"]


@pytest.mark.parametrize("override", SUBPROCESS)
def test_no_traceback_reaches_stderr(override, tmp_path):
    """Through a real process: the exit code and stderr a shell sees."""
    env = {**os.environ, "PYTHONPATH": str(Path(coalign.__file__).parents[1])}
    env.pop("COALIGN_DEBUG", None)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "coalign", "train", "demo", override, "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert_one_line_error(proc.stderr, override.split("=")[0].removesuffix(".x"))
    assert not out.exists()


def test_every_recipe_still_loads():
    """The new constraints accept every shipped recipe, full-sized and shrunk."""
    for path in sorted(recipes_dir().glob("*.yaml")):
        load_recipe(path)
        load_recipe(path, smoke=True)


def test_warmup_longer_than_the_run_is_allowed():
    """A short trial of a long recipe keeps its warmup: the learning rate ramps for the whole run."""
    recipe = load_recipe("demo", ["train.steps=10"])
    assert recipe.train.warmup_steps > recipe.train.steps
