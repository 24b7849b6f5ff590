"""Run the recipe's evaluators over its evaluation sources.

Evaluators are registered functions `evaluator(embedded_set, ctx) -> {metric: value}`; the suite
embeds each source once and hands the same embeddings to every evaluator. `ctx` carries the model,
its transforms and the source for evaluators that need more than pooled embeddings (late
interaction re-encodes tokens, for example).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from coalign.data.sources.base import Source
from coalign.data.transforms.base import Transform
from coalign.evaluate.classification import class_embeddings, classification_metrics
from coalign.evaluate.embed import EmbeddedSet, embed_source, text_encoder
from coalign.evaluate.retrieval import chunked_retrieval_metrics
from coalign.models.model import MultimodalModel
from coalign.registry import EVALUATORS


@dataclass
class EvalContext:
    model: MultimodalModel
    transforms: dict[str, Transform]
    source: Source
    encode_text: Callable[[list[str]], torch.Tensor]  # list[str] -> (n, E) normalised
    batch_size: int
    max_samples: int | None
    device: torch.device
    autocast: Any = None


def _galleries(eset: EmbeddedSet) -> dict[str, torch.Tensor]:
    return {m: e for m, e in eset.embeddings.items() if len(e)}


@EVALUATORS.register("zero_shot")
def zero_shot(eset: EmbeddedSet, ctx: EvalContext) -> dict[str, float]:
    """Classify each non-text modality by prompting with class names.

    Keys: `zero_shot/<modality>/<label>/<metric>`.
    """
    out: dict[str, float] = {}
    for key, task in eset.tasks.items():
        if key not in eset.labels:
            continue
        classes = class_embeddings(ctx.encode_text, task.classnames, task.templates)  # (C, E)
        for modality, emb in _galleries(eset).items():
            metrics = classification_metrics(emb @ classes.T, eset.labels[key])
            out.update({f"zero_shot/{modality}/{key}/{k}": v for k, v in metrics.items()})
    return out


@EVALUATORS.register("retrieval")
def retrieval(eset: EmbeddedSet, ctx: EvalContext) -> dict[str, float]:
    """Caption <-> sample retrieval, CLIP_benchmark's definitions: `retrieval/<modality>/<metric>`."""
    out: dict[str, float] = {}
    if not len(eset.captions):
        return out
    for modality, emb in _galleries(eset).items():
        metrics = chunked_retrieval_metrics(eset.captions, emb, eset.caption_owner)
        out.update({f"retrieval/{modality}/{k}": v for k, v in metrics.items()})
    return out


@torch.no_grad()
def evaluate(
    model: MultimodalModel,
    transforms: dict[str, Transform],
    sources: dict[str, Source],
    evaluators: list[str],
    batch_size: int = 256,
    max_samples: int | None = None,
    device: torch.device | None = None,
    progress: bool = False,
    autocast=None,
) -> dict[str, dict[str, float]]:
    """{dataset: {metric: value}} for every source and evaluator."""
    device = device or torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        results: dict[str, dict[str, float]] = {}
        encode_text = text_encoder(model, transforms["text"], device, batch_size, autocast)
        for name, source in sources.items():
            eset = embed_source(
                name, model, transforms, source, batch_size, max_samples, device, progress, autocast
            )
            ctx = EvalContext(
                model, transforms, source, encode_text, batch_size, max_samples, device, autocast
            )
            metrics: dict[str, float] = {
                "samples": float(max((len(e) for e in eset.embeddings.values()), default=0))
            }
            for ev in evaluators:
                metrics.update(EVALUATORS.get(ev)(eset, ctx))
            metrics.update({f"skipped/{k}": float(v) for k, v in eset.skipped.items()})
            results[name] = metrics
        return results
    finally:
        model.train(was_training)


def summary_rows(results: dict[str, dict[str, float]]) -> list[tuple[str, str, float]]:
    """(dataset, metric, value) for printing: top-1 zero-shot and R@1/5/10, the headline numbers."""
    rows = []
    for dataset, metrics in results.items():
        for k, v in metrics.items():
            if k.endswith("/acc1") or "recall@" in k:
                rows.append((dataset, k, v))
    return rows


def format_table(results: dict[str, dict[str, float]]) -> str:
    rows = summary_rows(results)
    if not rows:
        return "(no results)"
    width = max(len(r[1]) for r in rows)
    lines, last = [], None
    for dataset, metric, value in rows:
        if dataset != last:
            lines.append(f"\n{dataset}")
            last = dataset
        lines.append(f"  {metric:<{width}}  {100 * value:6.2f}%")
    return "\n".join(lines).lstrip("\n")
