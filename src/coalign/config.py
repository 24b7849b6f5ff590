"""Typed recipes: YAML -> pydantic models, dotted overrides, smoke shrinking, resolved-config saving.

A recipe names its parts (source, transform, encoder, objective) by registry name; the part's own
options sit beside the name and are validated against that part's `Config` at load time, so a typo
anywhere fails before any work starts, naming the field and the closest valid key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

from coalign.recipe_checks import part_errors
from coalign.registry import (
    DECODERS,
    ENCODERS,
    FUSION,
    SOURCES,
    ConfigError,
    StrictModel,
    format_validation_error,
)


class Part(pydantic.BaseModel):
    """A registry name plus that entry's options (validated by the registry, not here)."""

    model_config = pydantic.ConfigDict(extra="allow")

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SourceSpec(Part):
    source: str


class TransformSpec(Part):
    transform: str


class TowerSpec(Part):
    encoder: str
    # Fine-tuning (models/lock.py). lock: freeze the whole tower, kept in eval mode (LiT); its head
    # still trains. unlock_last: N > 0 trains the tower's last N blocks and what follows them.
    # freeze_norm: norm layers keep their weights and running statistics, locked or not.
    lock: bool = False
    unlock_last: int = pydantic.Field(0, ge=0)
    freeze_norm: bool = False
    # a locked tower's features, remembered per input row (exact: see models/lock.py FeatureCache)
    cache: bool = False
    # learning-rate multiplier for the tower's own parameters (not its head, `model.heads.<name>`):
    # a pretrained tower fine-tuned beside a new one usually wants a smaller step than the new one
    lr_scale: float = pydantic.Field(1.0, gt=0)

    @pydantic.model_validator(mode="after")
    def _unlock_needs_lock(self) -> TowerSpec:
        if self.unlock_last and not self.lock:
            raise ValueError("unlock_last needs lock: true (it unlocks the last blocks of a locked tower)")
        if self.cache and (not self.lock or self.unlock_last):
            raise ValueError(
                "cache needs a fully locked tower (lock: true, no unlock_last): only its "
                "features never change"
            )
        return self


class FusionSpec(Part):
    """`{fusion: cross, query: text, context: image, width: 256, ...}` (see models/fusion.py)."""

    fusion: str


class DecoderSpec(Part):
    """`{decoder: coca, text: text, context: image, width: 256, ...}` (see models/decoder.py)."""

    decoder: str


class ObjectiveSpec(Part):
    name: str
    weight: float = pydantic.Field(1.0, gt=0)  # 0 would train nothing; a negative weight maximises the loss
    lr_scale: float = pydantic.Field(1.0, gt=0)  # learning-rate multiplier for the objective's own parameters


class DataConfig(StrictModel):
    train: SourceSpec
    eval: dict[str, SourceSpec] = {}
    transforms: dict[str, TransformSpec]
    batch_size: int = 256  # at least 2 (see _pairs)
    num_workers: int = pydantic.Field(0, ge=0)
    # modality -> probability that a training sample goes without it (missing-modality robustness)
    drop_modalities: dict[str, float] = {}

    @pydantic.field_validator("drop_modalities")
    @classmethod
    def _probabilities(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {m: p for m, p in v.items() if not 0 <= p < 1}
        if bad:
            raise ValueError(f"drop probabilities must lie in [0, 1), got {bad}")
        return v

    @pydantic.field_validator("batch_size")
    @classmethod
    def _pairs(cls, v: int) -> int:
        if v < 2:
            # the loop skips batches of one sample, so batch_size 1 would train nothing and still exit 0
            raise ValueError(f"must be at least 2, got {v}: a contrastive batch needs two samples")
        return v


class InitFrom(StrictModel):
    """Start training from the weights of an existing run: every tower, head and fusion part, or
    only the towers (and their heads) named in `towers`. `init_from: RUN` is short for {run: RUN}."""

    run: str
    towers: list[str] | None = None  # None: the whole model


class ModelConfig(StrictModel):
    embed_dim: int = pydantic.Field(128, gt=0)
    towers: dict[str, TowerSpec] = pydantic.Field(min_length=1)
    head: str = "linear"
    # A part that mixes two towers' tokens, for objectives that read fused tokens (itm, mlm);
    # None: dual encoders only. The checkpoint then holds no fusion weights.
    fusion: FusionSpec | None = None
    # A caption decoder (CoCa's multimodal half) for the `caption` objective and for generation;
    # None: the model generates nothing and the checkpoint holds no decoder weights.
    decoder: DecoderSpec | None = None
    init_from: InitFrom | None = None  # build.py: init_from_run

    @pydantic.field_validator("init_from", mode="before")
    @classmethod
    def _run_alone(cls, v: Any) -> Any:
        return {"run": v} if isinstance(v, str) else v

    @pydantic.model_validator(mode="after")
    def _init_towers_exist(self) -> ModelConfig:
        named = (self.init_from.towers or []) if self.init_from else []
        unknown = [m for m in named if m not in self.towers]
        if unknown:
            raise ValueError(
                f"init_from.towers names {unknown}, not towers of this model ({list(self.towers)})"
            )
        return self


class TrainConfig(StrictModel):
    steps: int = pydantic.Field(1000, gt=0)
    lr: float = pydantic.Field(1e-3, gt=0)
    min_lr_ratio: float = pydantic.Field(0.0, ge=0, le=1)
    warmup_steps: int = pydantic.Field(100, ge=0)
    weight_decay: float = pydantic.Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = pydantic.Field(1e-6, gt=0)  # AdamW divides by sqrt(v) + eps; v is 0 for an unused weight
    grad_clip: float | None = 1.0  # max gradient norm; null: no clipping
    # GradCache: encode the batch in this many micro-batches (memory of one), losses on the whole batch
    accumulate: int = pydantic.Field(1, ge=1)
    # torch.compile each tower (inductor; on the CPU it builds C++ with gcc, a minute or so at start)
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: no codegen, for tests)
    # FSDP2 under torchrun: shard each tower's blocks over the ranks (train/fsdp.py); 1 process: ignored
    fsdp: bool = False
    # FSDP checkpoints: `full` (rank 0 writes the whole state) or `sharded` (each rank its shards,
    # torch.distributed.checkpoint; train/fsdp_checkpoint.py); every reader takes both
    checkpoint_format: Literal["full", "sharded"] = "full"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    log_every: int = pydantic.Field(10, gt=0)
    eval_every: int = pydantic.Field(0, ge=0)  # 0: only at the end
    checkpoint_every: int = pydantic.Field(500, gt=0)
    keep_checkpoints: int = pydantic.Field(2, ge=1)
    threads: int | None = pydantic.Field(None, ge=1)  # torch intra-op threads; None keeps torch's default

    @pydantic.field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"both AdamW betas must lie in [0, 1), got {list(v)}")
        return v

    @pydantic.field_validator("compile_backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if v != "inductor":
            from torch._dynamo import list_backends

            valid = list_backends(exclude_tags=())  # the debug ones (aot_eager, eager) too
            if v not in valid:
                raise ValueError(f"unknown torch.compile backend '{v}'; valid: {', '.join(valid)}")
        return v

    @pydantic.model_validator(mode="after")
    def _sharded_needs_fsdp(self) -> TrainConfig:
        if self.checkpoint_format == "sharded" and not self.fsdp:
            raise ValueError(
                "checkpoint_format=sharded writes each rank's FSDP shards and needs train.fsdp: true "
                "(without FSDP every rank holds the whole model: use checkpoint_format: full)"
            )
        return self

    @pydantic.field_validator("grad_clip")
    @classmethod
    def _clip(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            # clip_grad_norm_ with a negative max norm flips the gradient; 0 silently disabled clipping
            raise ValueError(f"must be > 0, got {v}; use null to train without clipping")
        return v


class EvaluatorSpec(Part):
    """An evaluator by registry name, with its options beside the name: `{name: knn, k: 10}`."""

    name: str


def evaluator_specs(items: list[str | dict | EvaluatorSpec]) -> list[EvaluatorSpec]:
    return [
        EvaluatorSpec(name=e) if isinstance(e, str) else EvaluatorSpec(**e) if isinstance(e, dict) else e
        for e in items
    ]


class EvalConfig(StrictModel):
    # registry names (`coalign list`), or {name: ..., option: value} for evaluators with options
    evaluators: list[str | EvaluatorSpec] = ["zero_shot", "retrieval"]
    batch_size: int = pydantic.Field(256, gt=0)
    max_samples: int | None = pydantic.Field(None, ge=1)  # None: every sample


class Recipe(StrictModel):
    name: str = "run"
    seed: int = 0
    data: DataConfig
    model: ModelConfig
    objectives: list[ObjectiveSpec] = pydantic.Field(min_length=1)
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    smoke: dict[str, Any] = {}  # dotted overrides that `--smoke` applies on top of the generic shrink

    def modalities(self) -> list[str]:
        return list(self.model.towers)


# --------------------------------------------------------------------------------------------- loading


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["train.steps=10", "model.towers.image.width=64"] -> {dotted key: YAML-parsed value}."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(
                f"override '{key.strip()}': the value {value!r} is not valid YAML: {_yaml_problem(err)}"
            ) from None
    return out


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error: 'line L, column C: problem (while parsing ... at line L0)'."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(err).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and start is not None:
        where += f" ({context} that starts at line {start.line + 1}, column {start.column + 1})"
    elif context:
        where += f" ({context})"
    return where


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        node = raw
        parts = key.split(".")
        for depth, p in enumerate(parts[:-1]):
            node = node[_list_index(p, node, key)] if isinstance(node, list) else node.setdefault(p, {})
            if not isinstance(node, dict | list):
                above = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"override '{key}': '{above}' is a value ({node!r}), not a section with keys; "
                    f"set it with {above}=..."
                )
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(last, node, key)] = value
        else:
            node[last] = value
    return raw


def _list_index(part: str, node: list, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override '{key}': '{part}' must be a list index below {len(node)}")
    return int(part)


def load_recipe(source: str | Path | dict, overrides: list[str] | None = None, smoke: bool = False) -> Recipe:
    raw = source if isinstance(source, dict) else _read_yaml(Path(source))
    if smoke:
        overrides_of_smoke = raw.get("smoke") or {}
        if not isinstance(overrides_of_smoke, dict):
            raise ConfigError("invalid recipe: smoke: must map dotted keys to values, e.g. {train.steps: 5}")
        raw = apply_overrides(raw, overrides_of_smoke)
    raw = apply_overrides(raw, parse_overrides(overrides or []))
    recipe = validate_recipe(raw)
    return shrink(recipe) if smoke else recipe


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        recipes = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
        builtin = recipes_dir() / f"{path.stem}.yaml"
        if path.suffix == "" and builtin.exists():
            path = builtin
        else:
            raise ConfigError(f"recipe '{path}' not found; built-in recipes: {', '.join(recipes)}")
    if path.is_dir():
        raise ConfigError(
            f"recipe '{path}' is a folder; name a recipe YAML file (to continue a run, use --resume {path})"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe '{path}' is not valid YAML: {_yaml_problem(err)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"recipe '{path}' cannot be read: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe '{path}' must be a YAML mapping, got {type(data).__name__}")
    return data


def recipes_dir() -> Path:
    """The repository's `recipes/` folder, so that `coalign train demo` finds the built-in recipe by name."""
    return Path(__file__).resolve().parents[2] / "recipes"


def validate_recipe(raw: dict[str, Any]) -> Recipe:
    try:
        recipe = Recipe(**raw)
    except pydantic.ValidationError as err:
        raise recipe_error(format_validation_error(err, "", Recipe).splitlines()) from None
    errors = part_errors(recipe)
    if errors:
        raise recipe_error([line for e in errors for line in e.splitlines()])
    return recipe


def recipe_error(errors: list[str]) -> ConfigError:
    """One error on one line (`invalid recipe: data.batch_size: ...`); several, one per line."""
    if len(errors) == 1:
        return ConfigError(f"invalid recipe: {errors[0]}")
    return ConfigError("invalid recipe:\n" + "\n".join(errors))


# --------------------------------------------------------------------------------------------- smoke


def shrink(recipe: Recipe) -> Recipe:
    """Make any recipe run in well under a minute on a laptop CPU (big_vision's `runlocal`)."""

    r = recipe.model_copy(deep=True)
    r.train.steps = min(r.train.steps, 20)
    r.train.warmup_steps = min(r.train.warmup_steps, 2)
    r.train.log_every = min(r.train.log_every, 5)
    r.train.eval_every = 0
    r.train.checkpoint_every = min(r.train.checkpoint_every, 10)
    r.data.batch_size = min(r.data.batch_size, 32)
    r.data.num_workers = 0
    r.eval.max_samples = min(r.eval.max_samples or 10**9, 128)
    # The tiny settings of the sources, encoders and fusion part (each Config's `tiny()`); a
    # transform's are left out: they fix the tower inputs (image size, tokenizer) that the recipe's
    # data and model agree on.
    parts = [(SOURCES, s.source, s) for s in [r.data.train, *r.data.eval.values()]]
    parts += [(ENCODERS, t.encoder, t) for t in r.model.towers.values()]
    parts += [(FUSION, r.model.fusion.fusion, r.model.fusion)] if r.model.fusion is not None else []
    parts += [(DECODERS, r.model.decoder.decoder, r.model.decoder)] if r.model.decoder is not None else []
    for registry, name, spec in parts:
        for key, small in registry.tiny(name).items():
            current = spec.options().get(key)
            setattr(spec, key, min(current, small) if isinstance(current, int | float) else small)
    return validate_recipe(r.model_dump())


def save_resolved(recipe: Recipe, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
