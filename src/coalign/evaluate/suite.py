"""Run the recipe's evaluators over its evaluation sources.

Evaluators are registered functions `evaluator(embedded_set, ctx) -> {metric: value}`; the suite
embeds each source once and hands the same embeddings to every evaluator. `ctx` carries the model,
its transforms and the source for evaluators that need more than pooled embeddings (late
interaction re-encodes tokens, for example).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from coalign.config import EvaluatorSpec, evaluator_specs
from coalign.data.sources.base import Source
from coalign.data.transforms.base import Transform
from coalign.evaluate.classification import chunked_classification_metrics, class_embeddings
from coalign.evaluate.embed import EmbeddedSet, embed_source, text_encoder
from coalign.evaluate.retrieval import chunked_retrieval_metrics
from coalign.models.model import MultimodalModel
from coalign.registry import EVALUATORS, ConfigError


@dataclass
class EvalContext:
    model: MultimodalModel
    transforms: dict[str, Transform]
    source: Source
    encode_text: Callable[[list[str]], torch.Tensor] | None  # list[str] -> (n, E) normalised; None: no text
    batch_size: int
    max_samples: int | None
    device: torch.device
    autocast: Any = None
    # The labelled training split of this dataset, embedded the same way, for evaluators that fit
    # something (linear probe, kNN, CoOp); None when the suite names no `train` source for it.
    train: EmbeddedSet | None = None
    options: dict[str, Any] = field(default_factory=dict)  # this evaluator's options from the suite


def require_train(eset: EmbeddedSet, ctx: EvalContext, evaluator: str) -> EmbeddedSet:
    """The dataset's training split, or an error saying how to name one."""
    if ctx.train is None:
        raise ConfigError(
            f"evaluator '{evaluator}' fits on a training split, but dataset '{eset.name}' has none; "
            f"name one as `train:` beside the dataset's source in the suite (or data.eval_train.{eset.name})"
        )
    return ctx.train


def _galleries(eset: EmbeddedSet) -> dict[str, torch.Tensor]:
    return {m: e for m, e in eset.embeddings.items() if bool(eset.has(m).any())}


@EVALUATORS.register("zero_shot")
def zero_shot(eset: EmbeddedSet, ctx: EvalContext) -> dict[str, float]:
    """Classify each non-text modality by prompting with class names (only the samples that have it).

    Keys: `zero_shot/<modality>/<label>/<metric>`.
    """
    out: dict[str, float] = {}
    for key, task in eset.tasks.items() if ctx.encode_text is not None else ():
        if key not in eset.labels:
            continue
        classes = class_embeddings(ctx.encode_text, task.classnames, task.templates)  # (C, E)
        for modality in _galleries(eset):
            emb, labels = eset.labelled(modality, key)
            metrics = chunked_classification_metrics(emb, classes, labels)
            out.update({f"zero_shot/{modality}/{key}/{k}": v for k, v in metrics.items()})
    return out


def _caption_retrieval(eset: EmbeddedSet, modality: str) -> dict[str, float]:
    """Captions <-> the samples that have `modality`; captions of samples without it are left out."""
    rows = eset.has(modality)
    keep = rows[eset.caption_owner]  # (T,) captions whose sample has the modality
    if not bool(keep.any()):
        return {}
    new_index = torch.cumsum(rows.long(), 0) - 1  # sample index -> row among the kept samples
    owner = new_index[eset.caption_owner[keep]]
    return chunked_retrieval_metrics(eset.captions[keep], eset.embeddings[modality][rows], owner)


def _pair_retrieval(eset: EmbeddedSet, a: str, b: str) -> dict[str, float]:
    """Sample-to-sample retrieval between two non-text modalities, over samples that have both.

    Named as CLIP_benchmark names image-text retrieval: `<x>_retrieval_recall@k` is retrieving x's
    item given the other modality's item as the query."""
    rows = eset.has(a, b)
    if int(rows.sum()) < 2:
        return {}
    metrics = chunked_retrieval_metrics(
        eset.embeddings[a][rows], eset.embeddings[b][rows], torch.arange(int(rows.sum()))
    )
    rename = {"image_retrieval": f"{b}_retrieval", "text_retrieval": f"{a}_retrieval"}
    return {rename[k.split("_recall")[0]] + k[k.index("_recall") :]: v for k, v in metrics.items()}


@EVALUATORS.register("retrieval")
def retrieval(eset: EmbeddedSet, ctx: EvalContext) -> dict[str, float]:
    """Retrieval between every pair of modalities the model has, CLIP_benchmark's definitions.

    Captions <-> each modality: `retrieval/<modality>/{image,text}_retrieval_recall@k` (CLIP_benchmark's
    names; "image" is the non-text side). Two non-text modalities a, b:
    `retrieval/<a>-<b>/<x>_retrieval_recall@k`, x the modality retrieved.
    """
    out: dict[str, float] = {}
    galleries = sorted(_galleries(eset))
    for modality in galleries if len(eset.captions) else []:
        metrics = _caption_retrieval(eset, modality)
        out.update({f"retrieval/{modality}/{k}": v for k, v in metrics.items()})
    for i, a in enumerate(galleries):
        for b in galleries[i + 1 :]:
            out.update({f"retrieval/{a}-{b}/{k}": v for k, v in _pair_retrieval(eset, a, b).items()})
    return out


@torch.no_grad()
def evaluate(
    model: MultimodalModel,
    transforms: dict[str, Transform],
    sources: dict[str, Source],
    evaluators: list[str | EvaluatorSpec],
    batch_size: int = 256,
    max_samples: int | None = None,
    device: torch.device | None = None,
    progress: bool = False,
    autocast=None,
    train_sources: dict[str, Source] | None = None,
    embedded: Callable[[str, str, Source], EmbeddedSet] | None = None,
) -> dict[str, dict[str, float]]:
    """{dataset: {metric: value}} for every source and evaluator.

    `train_sources[name]`, when given, is the labelled training split of dataset `name`, embedded
    once and handed to evaluators that fit something (linear probe, kNN, CoOp). `embedded(split,
    name, source)`, when given, replaces embedding (the suite runner passes a cached one)."""
    device = device or torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        results: dict[str, dict[str, float]] = {}
        specs = evaluator_specs(evaluators)
        encode_text = (
            text_encoder(model, transforms["text"], device, batch_size, autocast)
            if "text" in transforms
            else None
        )

        def embed(split: str, name: str, source: Source) -> EmbeddedSet:
            if embedded is not None:
                return embedded(split, name, source)
            limit = max_samples if split == "test" else None
            return embed_source(
                name, model, transforms, source, batch_size, limit, device, progress, autocast
            )

        for name, source in sources.items():
            eset = embed("test", name, source)
            train_source = (train_sources or {}).get(name)
            train = embed("train", name, train_source) if train_source is not None else None
            metrics: dict[str, float] = {"samples": float(len(eset))}
            for spec in specs:
                ctx = EvalContext(
                    model,
                    transforms,
                    source,
                    encode_text,
                    batch_size,
                    max_samples,
                    device,
                    autocast,
                    train,
                    spec.options(),
                )
                metrics.update(EVALUATORS.get(spec.name)(eset, ctx))
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
