"""Re-ranking search hits by the fusion part's image-text matching head (`coalign search --rerank K`,
the serve route's `rerank` field): ALBEF's inference, as `evaluate/rerank.py` does for evaluation.

The index finds the top K items for a text query by cosine similarity; each of them is read again
from the embedded source (the manifest's source spec and each row's `source_index`), put through
the run's eval transform and tower, fused with the query's tokens, and scored
p(match) = softmax(match_head(fused [CLS]))[1]. The K hits come back in that order with `score`
set to p; hits beyond the first K (if more were asked for) follow unchanged. Only text queries over
items of the modality the fusion part pairs with text can be re-ranked.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import torch

from coalign.models.fusion import match_scores
from coalign.registry import ConfigError
from coalign.search import METADATA
from coalign.search.query import Hit, SearchIndex

_items: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # index -> (source, source_index)
_lock = threading.Lock()


def supports_rerank(index) -> bool:
    """Whether the index's run has a fusion part with a text side (what re-ranking scores pairs with)."""
    try:
        fusion = getattr(index.loaded_run().model, "fusion", None)
    except (AttributeError, OSError, ValueError):  # an index without a loadable run
        return False
    return fusion is not None and "text" in (fusion.query, fusion.context)


def check_rerank(index: SearchIndex, k: int, modality: str, text_query: bool) -> None:
    """The one check of a re-ranking request, before any work: a clear one-line ConfigError."""
    if k < 1:
        raise ConfigError(f"rerank must be a positive number of hits to re-rank, got {k}")
    if not text_query:
        raise ConfigError("rerank scores (text, item) pairs: it needs a text query")
    fusion = getattr(index.loaded_run().model, "fusion", None)
    pair = () if fusion is None else (fusion.query, fusion.context)
    if "text" not in pair or modality not in pair:
        raise ConfigError(
            f"rerank needs a run with a fusion part over text and '{modality}' (and the itm objective, "
            f"e.g. the albef recipe); '{index.checkpoint}' has "
            + ("no fusion part" if fusion is None else f"one over {fusion.query} and {fusion.context}")
        )


def _source_items(index: SearchIndex):
    """The embedded source and each row's index in it (read once per index)."""
    with _lock:
        if index not in _items:
            from coalign.build import build_source  # here, so that importing search stays light
            from coalign.config import SourceSpec

            spec = index.manifest["source"]
            source = build_source(SourceSpec(**spec) if isinstance(spec, dict) else spec, "manifest.source")
            rows = pq.read_table(index.index_dir / METADATA, columns=["source_index"]).column(0).to_pylist()
            _items[index] = (source, rows)
        return _items[index]


@torch.no_grad()
def rerank_hits(index: SearchIndex, text: str, hits: list[Hit], k: int, modality: str = "image") -> list[Hit]:
    """`hits` (best first) with the first k re-ordered by ITM probability of (text, item)."""
    check_rerank(index, k, modality, text_query=True)
    run = index.loaded_run()
    model, device = run.model, next(run.model.parameters()).device
    head, rest = hits[:k], hits[k:]
    if not head:
        return hits
    source, source_index = _source_items(index)
    rng = np.random.default_rng(0)  # eval transforms are deterministic; the argument is required
    items = torch.stack([run.transforms[modality](source[source_index[h.row]][modality], rng) for h in head])
    query = model.features("text", run.transforms["text"].encode([text]).to(device)).tokens
    tokens = model.features(modality, items.to(device)).tokens
    n = len(head)
    q_rows, i_rows = torch.zeros(n, dtype=torch.long), torch.arange(n)
    fusion = model.fusion
    if fusion.query == "text":
        scores = match_scores(fusion, query, tokens, q_rows, i_rows)
    else:
        scores = match_scores(fusion, tokens, query, i_rows, q_rows)
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))  # equal scores: the index's order
    return [replace(head[i], score=float(scores[i])) for i in order] + rest
