"""Sharded indexes: `coalign index OUT --shards N` splits the rows into N contiguous ranges and builds one
FAISS index per range, so that no machine needs to hold the whole corpus:

    OUT/index/<modality>/shards.json        {"parts": [{"start", "stop", "file", "factory", "search_params"}]}
    OUT/index/<modality>/part_XXXXX.faiss   an index over rows start..stop-1 (its ids are row - start)

A `SearchIndex` searches every part in parallel threads (FAISS releases the GIL) and merges the
answers by score into global rows. SearchIndex.load(OUT, shards=[0, 1]) searches only some parts:
several workers, each with its parts in memory, answer with global ids and
cosine scores, and a front merges their hits by score (`merge_hits`), as the workers merge their parts.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from coalign.io import atomic_write_text
from coalign.registry import ConfigError

SHARDS = "shards.json"


def shard_dir(out: Path, modality: str) -> Path:
    return out / "index" / modality


def part_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous, near-equal ranges covering 0..n-1."""
    if not 1 <= parts <= n:
        raise ConfigError(f"--shards must be between 1 and the number of items ({n}), got {parts}")
    edges = np.linspace(0, n, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def write_layout(out: Path, modality: str, parts: list[dict[str, Any]]) -> None:
    atomic_write_text(shard_dir(out, modality) / SHARDS, json.dumps({"parts": parts}, indent=2))


def read_layout(out: Path, modality: str) -> dict[str, Any] | None:
    path = shard_dir(out, modality) / SHARDS
    return json.loads(path.read_text()) if path.is_file() else None


class ShardedIndex:
    """Parts searched in parallel and merged; the `search(q, k) -> (scores, rows)` of a FAISS index."""

    def __init__(self, parts: list[faiss.Index], starts: list[int]):
        self.parts, self.starts = parts, starts
        self.ntotal = sum(p.ntotal for p in parts)
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(parts)), thread_name_prefix="shard")

    def search(self, q: np.ndarray, k: int, allowed: np.ndarray | None = None):
        """(scores, rows) over every part; `allowed`: a boolean mask over all rows (an ID selector per
        part, the part's own nprobe / efSearch kept)."""
        from coalign.search.filters import search_parameters

        def one(i: int):
            part, start = self.parts[i], self.starts[i]
            kk = min(k, part.ntotal)
            if allowed is None:
                s, ids = part.search(q, kk)
            else:
                bitmap = np.packbits(allowed[start : start + part.ntotal], bitorder="little")
                sel = faiss.IDSelectorBitmap(part.ntotal, faiss.swig_ptr(bitmap))
                s, ids = part.search(q, kk, params=search_parameters(part, sel))
            return s, np.where(ids >= 0, ids + start, -1)

        return merge(list(self._pool.map(one, range(len(self.parts)))), k)


def merge(answers: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k of several (scores, rows) answers to the same queries, best first; equal scores:
    lower row first, as exact search orders them."""
    scores = np.concatenate([s for s, _ in answers], axis=1)
    rows = np.concatenate([r for _, r in answers], axis=1)
    scores = np.where(rows >= 0, scores, -np.inf)
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    s, r = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
    return s, np.where(np.isfinite(s), r, -1)


def merge_hits(answers: list[list[Any]], k: int) -> list[Any]:
    """A front's merge of several workers' hits for one query (objects or dicts with a `score`)."""
    score = lambda h: h["score"] if isinstance(h, dict) else h.score  # noqa: E731
    return sorted((h for hits in answers for h in hits), key=score, reverse=True)[:k]


def open_sharded(out: Path, modality: str, layout: dict, shards: list[int] | None, mmap: bool):
    """The ShardedIndex of the selected parts (all by default) and the rows they cover."""
    from coalign.search.index import apply_search_params

    parts = layout["parts"]
    chosen = list(range(len(parts))) if shards is None else list(shards)
    bad = [s for s in chosen if not (isinstance(s, int) and 0 <= s < len(parts))]
    if bad or not chosen:
        raise ConfigError(f"shards {bad or chosen} do not exist; this index has parts 0..{len(parts) - 1}")
    indexes, starts, covered = [], [], 0
    for s in chosen:
        p = parts[s]
        index = faiss.read_index(
            str(shard_dir(out, modality) / p["file"]), faiss.IO_FLAG_MMAP_IFC if mmap else 0
        )
        if index.ntotal != p["stop"] - p["start"]:
            raise ConfigError(
                f"part {s} of '{out}' holds {index.ntotal} vectors, not {p['stop'] - p['start']}"
            )
        apply_search_params(index, p.get("search_params", ""))
        indexes.append(index)
        starts.append(p["start"])
        covered += index.ntotal
    return ShardedIndex(indexes, starts), covered
