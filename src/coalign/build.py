"""Build a recipe's parts, and load a trained run: the shared entry for training, evaluation,
search and serving (so they all use the same transforms and the same `encode`). Library code: it
imports nothing from the trainer, the server or the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coalign.checkpoint import checkpoint_step, load_weights, model_weights, resolve_checkpoint
from coalign.config import InitFrom, Recipe, SourceSpec, load_recipe
from coalign.data.sources.base import Source
from coalign.data.transforms.base import Pipeline, Transform
from coalign.models.model import MultimodalModel
from coalign.registry import SOURCES, TRANSFORMS, ConfigError
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


def build_model(recipe: Recipe, transforms: dict[str, Transform], init: bool = False) -> MultimodalModel:
    """The recipe's model; with `init`, starting from the weights `model.init_from` names (training
    a new run; a resumed or loaded run reads its own checkpoint instead)."""
    inputs = {m: t.describe() for m, t in transforms.items() if "@" not in m}
    model = MultimodalModel.from_config(recipe.model, inputs)
    if init and recipe.model.init_from is not None:
        init_from_run(model, recipe.model.init_from, transforms)
    return model


def run_dir_of(checkpoint: Path) -> Path:
    """The run folder of a checkpoint (a checkpoint folder outside `checkpoints/` is its own)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


def init_checkpoint(init: InitFrom) -> Path:
    """The checkpoint `model.init_from` names, or a one-line error (the trainer asks before it
    writes anything into the new run's folder)."""
    if not Path(init.run).exists():
        raise ConfigError(f"model.init_from: no run or checkpoint folder '{init.run}'")
    return resolve_checkpoint(Path(init.run))


def init_from_run(model: MultimodalModel, init: InitFrom, transforms: dict[str, Transform]) -> int:
    """Copy the weights of run `init.run` into `model`: every tensor of the model, or those of the
    towers named in `init.towers` and their heads. Exact (the same tensors, bit for bit); anything
    missing or of another shape fails with one line. Returns how many tensors were copied."""
    where = "model.init_from"
    checkpoint = init_checkpoint(init)
    theirs = model_weights(load_weights(checkpoint))
    ours = model.state_dict()
    prefixes = (
        None if init.towers is None else tuple(f"{p}.{m}." for m in init.towers for p in ("towers", "heads"))
    )
    wanted = [k for k in ours if prefixes is None or k.startswith(prefixes)]
    missing = [k for k in wanted if k not in theirs]
    shapes = [k for k in wanted if k in theirs and theirs[k].shape != ours[k].shape]
    if missing or shapes:
        problems = [f"{len(missing)} tensors missing (e.g. {missing[0]})"] if missing else []
        if shapes:
            k = shapes[0]
            problems.append(
                f"{len(shapes)} of another shape (e.g. {k}: {tuple(theirs[k].shape)} there, "
                f"{tuple(ours[k].shape)} here)"
            )
        raise ConfigError(
            f"{where}: '{init.run}' does not fit this model: {'; '.join(problems)}; the towers it "
            "initialises must have the same architecture and inputs"
        )
    modalities = init.towers if init.towers is not None else list(model.towers)
    _check_same_inputs(run_dir_of(checkpoint), transforms, modalities, where)
    model.load_state_dict({k: theirs[k] for k in wanted}, strict=False)
    return len(wanted)


def _check_same_inputs(
    run_dir: Path, transforms: dict[str, Transform], modalities: list[str], where: str
) -> None:
    """A tower initialised from another run must read the inputs it was trained on."""
    recipe_path = run_dir / RECIPE_FILE
    if not recipe_path.is_file():
        return  # a bare checkpoint folder: nothing to compare against
    theirs = build_transforms(load_recipe(recipe_path), views=False)
    for m in modalities:
        if m in theirs:
            theirs[m].load(run_dir)
    problems = input_differences(theirs, transforms, modalities)
    if problems:
        raise ConfigError(
            f"{where}: '{run_dir}' was trained on other inputs: {'; '.join(problems)}; use its own "
            f"tokenizer (data.transforms.<modality>.path: {run_dir}/tokenizer.json) and input settings"
        )


def input_differences(a: dict[str, Transform], b: dict[str, Transform], modalities: list[str]) -> list[str]:
    """How two runs' transforms feed a tower differently: what they describe (image size, context
    length, vocabulary size, pad id) and their tokenizers, token for token (two BPE vocabularies of
    one size map words to different ids). Modalities one side lacks are passed over."""
    out = []
    for m in modalities:
        if m not in a or m not in b:
            continue
        da, db = a[m].describe(), b[m].describe()
        out += [f"{m}.{k}: {da[k]!r} vs {db[k]!r}" for k in sorted(set(da) & set(db)) if da[k] != db[k]]
        ta, tb = getattr(a[m], "tokenizer", None), getattr(b[m], "tokenizer", None)
        if ta is not None and tb is not None and ta.get_vocab() != tb.get_vocab():
            out.append(f"{m}: another tokenizer")
    return out


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
    run_dir = run_dir_of(checkpoint)
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
