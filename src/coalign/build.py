"""Build a recipe's parts, and load a trained run: the shared entry for training, evaluation,
search and serving (so they all use the same transforms and the same `encode`). Library code: it
imports nothing from the trainer, the server or the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coalign.checkpoint import checkpoint_step, load_weights, model_weights, resolve_checkpoint
from coalign.config import Recipe, SourceSpec, load_recipe
from coalign.data.sources.base import Source
from coalign.data.transforms.base import Pipeline, Transform
from coalign.models.model import MultimodalModel
from coalign.registry import SOURCES, TRANSFORMS
from coalign.runtime import Runtime

RECIPE_FILE = "recipe.yaml"


def build_source(spec: SourceSpec, where: str) -> Source:
    return SOURCES.create(spec.source, where=where, **spec.options())


def build_transforms(recipe: Recipe, views: bool = True) -> dict[str, Transform]:
    """One transform per key of `data.transforms`; `views=False` leaves out the `<modality>@<view>`
    keys, which only training objectives use."""
    return {
        key: TRANSFORMS.create(t.transform, where=f"data.transforms.{key}", **t.options())
        for key, t in recipe.data.transforms.items()
        if views or "@" not in key
    }


def prepare_transforms(transforms: dict[str, Transform], source: Source, run_dir: Path, resume: bool) -> None:
    """Fit each modality's transform on the training source (saving what it learnt in run_dir), then
    give every view `<modality>@<view>` the same learnt state, so all views share one tokenizer."""
    for key in sorted(transforms, key=lambda k: "@" in k):  # modalities first, then their views
        if resume or "@" in key:
            transforms[key].load(run_dir)
        else:
            transforms[key].fit(source, run_dir)


def build_model(recipe: Recipe, transforms: dict[str, Transform]) -> MultimodalModel:
    inputs = {m: t.describe() for m, t in transforms.items() if "@" not in m}
    return MultimodalModel.from_config(recipe.model, inputs)


@dataclass
class LoadedRun:
    recipe: Recipe
    model: MultimodalModel
    transforms: dict[str, Transform]  # in eval mode
    checkpoint: Path
    step: int

    @property
    def run_dir(self) -> Path:
        """The run folder (a checkpoint folder outside `checkpoints/` is its own run folder)."""
        parent = self.checkpoint.parent
        return parent.parent if parent.name == "checkpoints" else self.checkpoint

    def pipeline(self) -> Pipeline:
        return Pipeline(self.transforms)


def load_run(path: str | Path, runtime: Runtime | None = None) -> LoadedRun:
    """Load a run folder (its newest intact checkpoint) or one checkpoint folder, ready to encode on
    `runtime`'s device (default: the CPU)."""
    checkpoint = resolve_checkpoint(Path(path))
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint
    recipe_path = run_dir / RECIPE_FILE
    if not recipe_path.exists():
        raise FileNotFoundError(f"'{run_dir}' has no {RECIPE_FILE}; is it a coalign run folder?")
    recipe = load_recipe(recipe_path)
    transforms = build_transforms(recipe, views=False)
    for t in transforms.values():
        t.load(run_dir)
        t.eval()
    model = build_model(recipe, transforms)
    model.load_state_dict(model_weights(load_weights(checkpoint)))
    model.to((runtime or Runtime.cpu()).device).eval()
    return LoadedRun(recipe, model, transforms, checkpoint, checkpoint_step(checkpoint))
