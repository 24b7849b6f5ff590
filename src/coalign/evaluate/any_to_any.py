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

from coalign.evaluate.classification import class_embeddings, classification_metrics
from coalign.evaluate.embed import EmbeddedSet
from coalign.evaluate.retrieval import chunked_retrieval_metrics
from coalign.evaluate.suite import EvalContext
from coalign.registry import EVALUATORS, StrictModel


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


@EVALUATORS.register("zero_shot_fused")
def zero_shot_fused(eset: EmbeddedSet, ctx: EvalContext) -> dict[str, float]:
    """Zero-shot accuracy from each subset of modalities: `zero_shot_fused/<a+b>/<label>/<metric>`.

    Only samples that have every modality of the subset count, so a subset's row is what a user with
    only those modalities at test time gets."""
    opts = FusionOptions(**ctx.options)
    modalities = _non_text(eset)
    largest = min(opts.max_subset or len(modalities), len(modalities))
    out: dict[str, float] = {}
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
                name = "+".join(subset)
                out.update({f"zero_shot_fused/{name}/{key}/{k}": v for k, v in metrics.items()})
    return out


zero_shot_fused.Config = FusionOptions  # type: ignore[attr-defined]  (options checked at recipe load)


@EVALUATORS.register("retrieval_given_rest")
def retrieval_given_rest(eset: EmbeddedSet, ctx: EvalContext) -> dict[str, float]:
    """For each modality m (text included, by each sample's first caption): retrieve m's item among
    all samples given the combination of every other modality of the same sample.

    Keys `retrieval_given_rest/<m>/recall@k`; only samples that have every modality take part."""
    opts = FusionOptions(**ctx.options)
    embeddings = {m: eset.embeddings[m] for m in _non_text(eset)}
    rows = eset.has(*embeddings)
    if len(eset.captions):
        embeddings["text"], has_text = _first_caption(eset)
        rows &= has_text
    if len(embeddings) < 3 or int(rows.sum()) < 2:
        return {}  # with two modalities this is plain retrieval
    n = int(rows.sum())
    out: dict[str, float] = {}
    for target in sorted(embeddings):
        query = combine([e[rows] for m, e in embeddings.items() if m != target], opts.combine)
        metrics = chunked_retrieval_metrics(query, embeddings[target][rows], torch.arange(n))
        for k, v in metrics.items():
            if k.startswith("image_retrieval"):  # query -> target item
                out[f"retrieval_given_rest/{target}/recall@{k.split('@')[1]}"] = v
    return out


retrieval_given_rest.Config = FusionOptions  # type: ignore[attr-defined]
