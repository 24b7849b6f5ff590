"""The `zero_shot` evaluator: classify each non-text modality by prompting with class names."""

from __future__ import annotations

from coalign.evaluate.base import EvalContext, Evaluator, Metric, register
from coalign.evaluate.classification import chunked_classification_metrics, class_embeddings
from coalign.evaluate.embed import EmbeddedSet


@register("zero_shot")
class ZeroShot(Evaluator):
    """Zero-shot classification (CLIP prompt ensembling) of every label key with class names, per
    non-text modality, over the samples that have it. Target: the modality; label: the key;
    metrics `acc1` (headline), `acc5`, `mean_per_class_recall`."""

    task = "zeroshot_classification"
    headlines = frozenset({"acc1"})

    def __call__(self, eset: EmbeddedSet, ctx: EvalContext) -> list[Metric]:
        out: list[Metric] = []
        if ctx.encode_text is None:
            return out
        device = ctx.runtime.device
        for key, task in eset.tasks.items():
            if key not in eset.labels:
                continue
            classes = class_embeddings(ctx.encode_text, task.classnames, task.templates).to(device)  # (C, E)
            for modality in eset.embeddings:
                if not bool(eset.has(modality).any()):
                    continue
                emb, labels = eset.labelled(modality, key)
                values = chunked_classification_metrics(emb.to(device), classes, labels)
                out += self.metrics(eset, modality, key, values)
        return out
