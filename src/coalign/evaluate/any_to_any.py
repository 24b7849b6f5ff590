"""Evaluators for models with three or more modalities.

- `zero_shot_fused`: zero-shot classification from every subset of the non-text modalities, so the
  table shows what each modality adds and what is lost when one is absent at test time.
- `retrieval_given_rest`: retrieve each modality's item given all the others together (Symile's
  evaluation): the query is the combination of the other modalities' embeddings.

How several embeddings combine into one query is an option, because it depends on the objective:
`combine: product` is the multilinear inner product that Symile trains (<a, b, c> = sum a*b*c, so
the query for c is a*b elementwise); `combine: mean` (the default) averages unit vectors, the natural
fusion for pairwise objectives (anchored, all pairs, CLIP), whose scores are cosine similarities.
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch
import torch.nn.functional as F

from coalign.evaluate.base import EvalContext, Evaluator, Metric, register
from coalign.evaluate.classification import class_embeddings, classification_metrics
from coalign.evaluate.embed import EmbeddedSet
from coalign.evaluate.retrieval import HEADLINE_KS, chunked_retrieval_recalls
from coalign.registry import StrictModel


class FusionOptions(StrictModel):
    combine: Literal["mean", "product"] = "mean"
    max_subset: int | None = None  # largest subset of modalities to fuse (None: all of them)


def combine(embeddings: list[torch.Tensor], how: str) -> torch.Tensor:
    """Fuse (n, E) embeddings of several modalities into one (n, E) query."""
    if how == "product":
        out = embeddings[0]
        for e in embeddings[1:]:
            out = out * e
        return out  # unnormalised: the multilinear inner product is what Symile scores
    return F.normalize(torch.stack(embeddings).mean(0), dim=-1)


def _non_text(eset: EmbeddedSet) -> list[str]:
    return sorted(m for m in eset.embeddings if m != "text" and bool(eset.has(m).any()))


def _first_caption(eset: EmbeddedSet) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, E) the first caption of each sample and (N,) bool which samples have one."""
    n = len(eset)
    first = torch.full((n,), -1, dtype=torch.long)
    order = torch.arange(len(eset.caption_owner) - 1, -1, -1)  # reversed, so the first caption wins
    first[eset.caption_owner[order]] = order
    has = first >= 0
    out = torch.zeros(n, eset.captions.shape[1] if len(eset.captions) else 1)
    out[has] = eset.captions[first[has]]
    return out, has


@register("zero_shot_fused")
class ZeroShotFused(Evaluator):
    """Zero-shot accuracy from each subset of modalities: target `a+b`, label the key, metrics as
    `zero_shot`'s (`acc1` the headline).

    Only samples that have every modality of the subset count, so a subset's row is what a user with
    only those modalities at test time gets."""

    Config = FusionOptions
    task = "zeroshot_classification"
    headlines = frozenset({"acc1"})

    def __call__(self, eset: EmbeddedSet, ctx: EvalContext) -> list[Metric]:
        opts: FusionOptions = self.config
        modalities = _non_text(eset)
        largest = min(opts.max_subset or len(modalities), len(modalities))
        out: list[Metric] = []
        for key, task in eset.tasks.items() if ctx.encode_text is not None else ():
            if key not in eset.labels:
                continue
            classes = class_embeddings(ctx.encode_text, task.classnames, task.templates)  # (C, E)
            for size in range(2, largest + 1):
                for subset in itertools.combinations(modalities, size):
                    rows = eset.has(*subset)
                    if not bool(rows.any()):
                        continue
                    query = combine([eset.embeddings[m][rows] for m in subset], opts.combine)
                    metrics = classification_metrics(query @ classes.T, eset.labels[key][rows])
                    out += self.metrics(eset, "+".join(subset), key, metrics)
        return out


@register("retrieval_given_rest")
class RetrievalGivenRest(Evaluator):
    """For each modality m (text included, by each sample's first caption): retrieve m's item among
    all samples given the combination of every other modality of the same sample.

    Target m, metrics `recall@k` (@1 and @5 the headlines); only samples that have every modality take
    part."""

    Config = FusionOptions

    def __call__(self, eset: EmbeddedSet, ctx: EvalContext) -> list[Metric]:
        opts: FusionOptions = self.config
        embeddings = {m: eset.embeddings[m] for m in _non_text(eset)}
        rows = eset.has(*embeddings)
        if len(eset.captions):
            embeddings["text"], has_text = _first_caption(eset)
            rows &= has_text
        if len(embeddings) < 3 or int(rows.sum()) < 2:
            return []  # with two modalities this is plain retrieval
        n = int(rows.sum())
        out: list[Metric] = []
        for target in sorted(embeddings):
            query = combine([e[rows] for m, e in embeddings.items() if m != target], opts.combine)
            recalls = chunked_retrieval_recalls(query, embeddings[target][rows], torch.arange(n))
            for k, v in recalls.text_to_image.items():  # query -> target item
                out.append(self.metric(eset, target, None, f"recall@{k}", v, headline=k in HEADLINE_KS))
        return out
