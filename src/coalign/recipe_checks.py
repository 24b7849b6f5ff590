"""Whether a typed recipe's parts exist and fit together: the checks `config.validate_recipe` runs
after pydantic has typed the recipe, before any work starts. Each returns one line per mistake,
naming the field and what would be valid.

Kept apart from `config.py` (the recipe's types and its loading) because these read every registry:
they are the one place where a recipe meets the parts it names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from coalign.registry import (
    DECODERS,
    ENCODERS,
    EVALUATORS,
    FUSION,
    HEADS,
    OBJECTIVES,
    SOURCES,
    TRANSFORMS,
    ConfigError,
    Registry,
)

if TYPE_CHECKING:
    from coalign.config import Recipe


def _name_and_options(item: Any) -> tuple[str, dict[str, Any]]:
    """An evaluator entry as written (a name, a mapping, or an EvaluatorSpec) -> (name, options)."""
    if isinstance(item, str):
        return item, {}
    if isinstance(item, dict):
        return str(item.get("name")), {k: v for k, v in item.items() if k != "name"}
    return item.name, item.options()


def evaluator_errors(items: list[Any], where: str, train_split: bool = True) -> list[str]:
    """Unknown evaluator names and options that do not fit the evaluator's Config, by position; with
    `train_split=False` (a recipe's evaluation sets have no labelled training split) also the
    evaluators that fit on one."""

    errors = []
    specs = [_name_and_options(item) for item in items]
    names = [name for name, _ in specs]
    errors += [
        f"{where}.{i}: evaluator '{name}' is listed twice; its results would overwrite each other "
        "(evaluate twice with different options in separate runs or suites)"
        for i, (name, _) in enumerate(specs)
        if name in names[:i]
    ]
    for i, (name, options) in enumerate(specs):
        try:
            EVALUATORS.validate(name, options, f"{where}.{i}")
        except ConfigError as err:
            errors.append(f"{where}.{i}: {err}" if not str(err).startswith(where) else str(err))
            continue
        if not train_split and getattr(EVALUATORS.get(name), "needs_train", False):
            errors.append(
                f"{where}.{i}: evaluator '{name}' fits on a labelled training split, which only a "
                "suite names; run it with `coalign eval RUN --suite SUITE.yaml` (a `train:` split beside "
                "the dataset's source)"
            )
    return errors


def part_errors(recipe: Recipe) -> list[str]:
    """Every named part exists in its registry and its options fit its Config, and the parts fit
    together (tower inputs, batch keys, fusion, views, drop probabilities): one line per mistake."""

    checks: list[tuple[Registry, str, dict, str]] = [
        (SOURCES, recipe.data.train.source, recipe.data.train.options(), "data.train")
    ]
    checks += [(SOURCES, s.source, s.options(), f"data.eval.{k}") for k, s in recipe.data.eval.items()]
    checks += [
        (TRANSFORMS, t.transform, t.options(), f"data.transforms.{m}")
        for m, t in recipe.data.transforms.items()
    ]
    checks += [
        (ENCODERS, t.encoder, t.options(), f"model.towers.{m}") for m, t in recipe.model.towers.items()
    ]
    checks += [(OBJECTIVES, o.name, o.options(), f"objectives.{i}") for i, o in enumerate(recipe.objectives)]
    if recipe.model.fusion is not None:
        checks.append((FUSION, recipe.model.fusion.fusion, recipe.model.fusion.options(), "model.fusion"))
    if recipe.model.decoder is not None:
        spec = recipe.model.decoder
        checks.append((DECODERS, spec.decoder, spec.options(), "model.decoder"))
    errors = []
    parsed: dict[str, Any] = {}  # where -> the part's validated Config (None: the part has no Config)
    for registry, name, options, where in checks:
        try:
            registry.get(name)
            parsed[where] = registry.validate(name, options, where)
        except ConfigError as err:
            errors.append(_at(where, err))
    errors += _tower_input_errors(recipe, parsed)
    errors += _batch_key_errors(recipe, parsed)
    errors += _fusion_errors(recipe, parsed)
    errors += _decoder_errors(recipe, parsed)
    try:
        HEADS.get(recipe.model.head)
    except ConfigError as err:
        errors.append(f"model.head: {err}")
    errors += evaluator_errors(recipe.eval.evaluators, "eval.evaluators", train_split=False)
    missing = [m for m in recipe.model.towers if m not in recipe.data.transforms]
    if missing:
        errors.append(f"data.transforms: no transform for modalities {missing}; every tower needs one")
    errors += _view_errors(recipe)
    errors += [
        f"data.drop_modalities.{m}: the model has no '{m}' tower; towers: {', '.join(recipe.model.towers)}"
        for m in recipe.data.drop_modalities
        if m not in recipe.model.towers
    ]
    if recipe.train.accumulate > recipe.data.batch_size:
        errors.append(
            f"train.accumulate: {recipe.train.accumulate} micro-batches cannot be cut from a batch of "
            f"{recipe.data.batch_size} (data.batch_size); use at most that many"
        )
    return errors


def _at(where: str, err: Exception) -> str:
    return str(err) if str(err).startswith(where) else f"{where}: {err}"


def _tower_input_errors(recipe: Recipe, parsed: dict[str, Any]) -> list[str]:
    """Each tower's Config with the options its transform fills in (image_size, vocab_size, ...) still
    validates, and the options the recipe sets itself agree with what the transform produces."""
    from coalign.models.encoders.base import fill_inputs, input_mismatches

    errors = []
    for m, tower in recipe.model.towers.items():
        where, source = f"model.towers.{m}", f"data.transforms.{m}"
        if where not in parsed or source not in parsed or m not in recipe.data.transforms:
            continue  # already reported: an unknown name or an option that does not fit
        transform = TRANSFORMS.get(recipe.data.transforms[m].transform)
        try:
            inputs = transform.describe_config(parsed[source])
        except (ValueError, OSError) as err:
            errors.append(_at(source, err))
            continue
        config_cls = ENCODERS.config_class(tower.encoder)
        options = tower.options()
        errors += [f"{where}.{bad}" for bad in input_mismatches(config_cls, options, inputs)]
        filled = fill_inputs(config_cls, options, inputs)
        taken = {k: v for k, v in filled.items() if k not in options or options[k] is None}
        try:
            ENCODERS.validate(tower.encoder, filled, where)
        except ConfigError as err:
            given = ", ".join(f"{k}={v!r}" for k, v in taken.items())
            errors += [f"{line} ({given} from {source})" for line in str(err).splitlines()]
    return errors


def _batch_key_errors(recipe: Recipe, parsed: dict[str, Any]) -> list[str]:
    """Every batch key an objective names is a key of data.transforms: the batch holds exactly those
    (each tower's modality, and each view `<modality>@<view>`)."""
    keys = list(recipe.data.transforms)
    errors = []
    for i in range(len(recipe.objectives)):
        cfg = parsed.get(f"objectives.{i}")
        for field, named in (cfg.batch_keys() if hasattr(cfg, "batch_keys") else {}).items():
            missing = [k for k in named if k not in keys]
            no_tower = [k for k in missing if k.split("@", 1)[0] not in recipe.model.towers]
            if no_tower:
                why = f"the model has no tower for {no_tower}; towers: {', '.join(recipe.model.towers)}"
            elif missing:
                why = f"no transform makes the views {missing}; add them under data.transforms"
            else:
                continue
            errors.append(f"objectives.{i}.{field}: {why}")
    return errors


def _fusion_errors(recipe: Recipe, parsed: dict[str, Any]) -> list[str]:
    """The fusion part names towers the model has, and every objective that reads fused tokens (its
    Config says `needs_fusion`) has a fusion part over the modalities it pairs."""
    errors = []
    fusion = parsed.get("model.fusion")
    for field, tower in (fusion.towers() if fusion is not None else {}).items():
        if tower not in recipe.model.towers:
            errors.append(
                f"model.fusion.{field}: the model has no '{tower}' tower; "
                f"towers: {', '.join(recipe.model.towers)}"
            )
    for i, spec in enumerate(recipe.objectives):
        cfg = parsed.get(f"objectives.{i}")
        if not getattr(cfg, "needs_fusion", False):
            continue
        if recipe.model.fusion is None:
            errors.append(
                f"objectives.{i}: '{spec.name}' reads fused tokens; add a fusion part under model.fusion, "
                f"e.g. {{fusion: cross, query: text, context: image}} "
                f"(fusion parts: {', '.join(FUSION.names())})"
            )
        elif fusion is not None and set(cfg.modalities) != set(fusion.towers().values()):
            errors.append(
                f"objectives.{i}.modalities: {list(cfg.modalities)} are not the towers model.fusion mixes "
                f"({fusion.query}, {fusion.context})"
            )
        elif getattr(cfg, "fusion_kind", None) not in (None, recipe.model.fusion.fusion):
            errors.append(
                f"model.fusion.fusion: '{spec.name}' (objectives.{i}) needs a '{cfg.fusion_kind}' fusion "
                f"part, got '{recipe.model.fusion.fusion}'"
            )
    return errors


def _decoder_errors(recipe: Recipe, parsed: dict[str, Any]) -> list[str]:
    """The decoder names towers the model has, its text tower is causal (the unimodal half of CoCa's
    decoder: a position must not read the token it predicts), and every objective whose Config says
    `needs_decoder` has one."""
    errors = []
    decoder = parsed.get("model.decoder")
    for field, tower in (decoder.towers() if decoder is not None else {}).items():
        if tower not in recipe.model.towers:
            errors.append(
                f"model.decoder.{field}: the model has no '{tower}' tower; "
                f"towers: {', '.join(recipe.model.towers)}"
            )
    if decoder is not None and decoder.text in recipe.model.towers:
        text = recipe.model.towers[decoder.text]
        if not text.options().get("causal", False):
            errors.append(
                f"model.towers.{decoder.text}.causal: the decoder continues this tower's tokens, so it "
                "must be causal (set causal: true; pool: eos gives CoCa's contrastive text embedding)"
            )
    for i, spec in enumerate(recipe.objectives):
        cfg = parsed.get(f"objectives.{i}")
        if getattr(cfg, "needs_decoder", False) and recipe.model.decoder is None:
            errors.append(
                f"objectives.{i}: '{spec.name}' trains a caption decoder; add one under model.decoder, "
                f"e.g. {{decoder: coca, text: text, context: image}} "
                f"(decoders: {', '.join(DECODERS.names())})"
            )
    return errors


def _view_errors(recipe: Recipe) -> list[str]:
    """A transform key is a tower's modality or a view `<modality>@<view>` of one; a view uses its
    modality's transform with the same shared options (same tower input, same tokenizer)."""
    errors = []
    transforms = recipe.data.transforms
    for key, spec in transforms.items():
        base = key.split("@", 1)[0]
        if base not in recipe.model.towers:
            errors.append(
                f"data.transforms.{key}: the model has no '{base}' tower; "
                f"towers: {', '.join(recipe.model.towers)} (views are named <modality>@<view>)"
            )
            continue
        if key == base or base not in transforms:
            continue
        parent = transforms[base]
        if spec.transform != parent.transform:
            errors.append(
                f"data.transforms.{key}.transform: a view of '{base}' must use '{parent.transform}'"
            )
            continue
        cls = TRANSFORMS.get(spec.transform)
        defaults = TRANSFORMS.config_class(spec.transform)()
        for option in getattr(cls, "shared_with_views", ()):
            mine = spec.options().get(option, getattr(defaults, option))
            theirs = parent.options().get(option, getattr(defaults, option))
            if mine != theirs:
                errors.append(
                    f"data.transforms.{key}.{option}: {mine!r} differs from data.transforms.{base}.{option} "
                    f"({theirs!r}); a view shares its modality's tower input and learnt state"
                )
    return errors
