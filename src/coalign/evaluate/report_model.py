"""What the report shows of a run's model: zero-shot confusion matrices and retrieval examples.

The run's latest checkpoint embeds the first eval dataset once (at most `max_samples` samples); the
confusion and retrieval sections of the page (`coalign.evaluate.report`) read the `ModelView` it gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from coalign.data.sample import first_caption
from coalign.data.sources.base import Source
from coalign.evaluate.classification import class_embeddings, confusion_matrix
from coalign.evaluate.embed import EmbeddedSet, embed_eval_set, text_encoder
from coalign.runtime import Runtime

TOP_K = 5  # images shown per retrieval query


class Missing(Exception):
    """A section's data is absent; the message is shown on the page in the section's place."""


@dataclass
class Confusion:
    modality: str
    key: str  # the label key, e.g. "shape"
    classnames: list[str]
    matrix: torch.Tensor  # (C, C) counts; row = true class, column = predicted


@dataclass
class Example:
    caption: str
    owner: int  # source index of the caption's own sample
    top: list[tuple[int, float]]  # (source index, similarity), best first
    own_rank: int  # 1-based rank of the caption's own sample in the whole gallery, ties counted against it


@dataclass
class ModelView:
    dataset: str
    checkpoint: Path
    samples: int
    source: Source
    confusions: list[Confusion]
    examples: list[Example]
    gallery: str | None  # the modality retrieval examples search ("image"), None when there is none


@torch.no_grad()
def inspect_model(run_dir: Path, max_samples: int = 500, examples: int = 8) -> ModelView:
    """Embed the first eval dataset with the run's latest checkpoint: zero-shot confusion matrices per
    (modality, label key), and the top-5 gallery samples for `examples` captions spread over the set.

    On the GPU when there is one, in fp32: a few hundred samples cost nothing, and the page's
    matrices and ranks are then exactly what a reader recomputes from the checkpoint."""
    from coalign.build import build_source, load_run

    runtime = Runtime.create("fp32")
    try:
        run = load_run(run_dir, runtime)
    except FileNotFoundError as err:
        raise Missing(f"no model to load: {err}") from None
    if not run.recipe.data.eval:
        raise Missing("the recipe names no evaluation dataset (data.eval)")
    if "text" not in run.transforms:
        raise Missing("the model has no text tower: no class prompts or captions to embed")
    name, spec = next(iter(run.recipe.data.eval.items()))
    source = build_source(spec, f"data.eval.{name}")
    batch = run.recipe.eval.batch_size
    eset = embed_eval_set(name, run.model, run.transforms, source, runtime, batch, max_samples)
    index = eset.indices  # (N,) source index per row (embed_eval_set skips samples it cannot use)
    encode_text = text_encoder(run.model, run.transforms["text"], runtime, batch)
    confusions = []
    for key, task in eset.tasks.items():
        if key not in eset.labels:
            continue
        classes = class_embeddings(encode_text, task.classnames, task.templates)  # (C, E)
        for modality, emb in eset.embeddings.items():
            if len(emb):
                preds = (emb @ classes.T).argmax(dim=1)  # (N,)
                cm = confusion_matrix(preds, eset.labels[key], len(task.classnames))
                confusions.append(Confusion(modality, key, task.classnames, cm))
    gallery = "image" if len(eset.embeddings.get("image", ())) else None
    picked = _examples(eset, gallery, source, index, examples) if gallery else []
    samples = max((len(e) for e in eset.embeddings.values()), default=0)
    return ModelView(name, run.checkpoint, samples, source, confusions, picked, gallery)


def _examples(eset: EmbeddedSet, gallery: str, source: Source, index: torch.Tensor, n: int) -> list[Example]:
    """The top gallery samples for the first caption of `n` samples spread evenly over the set."""
    emb = eset.embeddings[gallery]  # (N, E)
    first: dict[int, int] = {}  # sample row -> its first caption
    for t, owner in enumerate(eset.caption_owner.tolist()):
        first.setdefault(owner, t)
    rows = sorted(first)
    out = []
    for pos in sorted({int(p) for p in np.linspace(0, len(rows) - 1, min(n, len(rows)))}) if n else []:
        row = rows[pos]
        scores = eset.captions[first[row]] @ emb.T  # (N,)
        top = scores.topk(min(TOP_K, len(scores)))
        # Pessimistic, as the recall metrics: every other sample scoring >= the own one ranks above it.
        own_rank = int((scores >= scores[row]).sum())
        text = source[int(index[row])].get("text")  # the first non-empty caption, as embed_eval_set took it
        caption = first_caption(text)
        hits = [(int(index[i]), float(s)) for s, i in zip(top.values, top.indices, strict=True)]
        out.append(Example(caption, int(index[row]), hits, own_rank))
    return out
