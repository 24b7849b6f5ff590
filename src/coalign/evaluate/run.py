"""`evaluate()`: run evaluators over evaluation sources.

Each source is embedded once and the same `EmbeddedSet` is handed to every evaluator, with an
`EvalContext` (the model, its transforms, the source and the `Runtime`) for evaluators that need
more than pooled embeddings (late interaction re-encodes tokens, CoOp trains prompts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from coalign.config import EvaluatorSpec, evaluator_specs
from coalign.data.sources.base import Source
from coalign.data.transforms.base import Transform
from coalign.evaluate.base import EvalContext, Evaluator, Metric, build_evaluator
from coalign.evaluate.embed import EmbeddedSet, embed_eval_set, text_encoder
from coalign.evaluate.results import DatasetInfo, Results
from coalign.models.model import MultimodalModel
from coalign.runtime import Runtime

EvaluatorLike = str | dict | EvaluatorSpec | Evaluator


def build_evaluators(items: Sequence[EvaluatorLike], where: str = "evaluators") -> list[Evaluator]:
    """Evaluators from names, `{name, **options}` specs, or evaluators already built."""

    def build(i: int, item: EvaluatorLike) -> Evaluator:
        if isinstance(item, Evaluator):
            return item
        (spec,) = evaluator_specs([item])
        return build_evaluator(spec.name, spec.options(), f"{where}.{i}")

    return [build(i, item) for i, item in enumerate(items)]


@torch.no_grad()
def evaluate(
    model: MultimodalModel,
    transforms: dict[str, Transform],
    sources: dict[str, Source],
    evaluators: Sequence[EvaluatorLike],
    runtime: Runtime,
    batch_size: int = 256,
    max_samples: int | None = None,
    progress: bool = False,
    train_sources: dict[str, Source] | None = None,
    embedded: Callable[[str, str, Source], EmbeddedSet] | None = None,
) -> Results:
    """Every evaluator's records on every source; the model runs on `runtime` (it must be on its device).

    `train_sources[name]`, when given, is the labelled training split of dataset `name`, embedded
    once and handed to evaluators that fit something (linear probe, kNN, CoOp). `embedded(split,
    name, source)`, when given, replaces embedding (suites pass a cached one)."""
    built = build_evaluators(evaluators)
    was_training = model.training
    model.eval()
    try:
        encode_text = (
            text_encoder(model, transforms["text"], runtime, batch_size) if "text" in transforms else None
        )

        def embed(split: str, name: str, source: Source) -> EmbeddedSet:
            if embedded is not None:
                return embedded(split, name, source)
            limit = max_samples if split == "test" else None
            return embed_eval_set(name, model, transforms, source, runtime, batch_size, limit, progress)

        metrics: list[Metric] = []
        datasets: dict[str, DatasetInfo] = {}
        for name, source in sources.items():
            eset = embed("test", name, source)
            eset = eset if eset.name == name else replace(eset, name=name)  # records name the dataset
            train_source = (train_sources or {}).get(name)
            train = embed("train", name, train_source) if train_source is not None else None
            ctx = EvalContext(model, transforms, source, encode_text, runtime, batch_size, max_samples, train)
            for evaluator in built:
                metrics += evaluator(eset, ctx)
            datasets[name] = DatasetInfo(len(eset), dict(eset.skipped), [e.describe() for e in built])
        return Results(metrics, datasets)
    finally:
        model.train(was_training)
