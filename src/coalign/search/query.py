"""Query an embedded (and usually indexed) folder: the library side of `coalign search` and the server.

Loading is cheap: metadata only. The model is loaded the first time a query is encoded, and each
modality's FAISS index (or, without `coalign index`, its raw shards for exact search) the first
time that modality is searched. Thread-safe for the concurrent requests of a web server.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc
import torch

from coalign.data.sources.base import SampleError
from coalign.registry import ConfigError
from coalign.runtime import Runtime
from coalign.search import (
    METADATA,
    ShardRows,
    finished_manifest,
    index_path,
    load_embeddings,
    open_embeddings,
    open_metadata,
    thumbnail_file,
)
from coalign.search.combine import COMBINE, combine_vectors
from coalign.search.filters import PREFILTER_MAX, LabelIndex, selector_search
from coalign.search.index import apply_search_params, read_report
from coalign.search.shards import ShardedIndex, open_sharded, read_layout

if TYPE_CHECKING:
    from coalign.search.onnx_towers import OnnxTowers


@dataclass
class Hit:
    id: str
    score: float
    row: int
    caption: str | None
    path: str | None
    labels: dict[str, int]


def exact_search(
    x: np.ndarray, q: np.ndarray, k: int, chunk: int = 262_144, allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows), each (nq, k), best first (equal scores: lower row first); x is scanned in chunks
    so that a million rows never need an (nq, n) score matrix. `allowed`: a boolean mask of the rows
    that may be returned (fewer than k allowed: the rest of the answer is row -1)."""
    best_s = np.zeros((len(q), 0), dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for start in range(0, len(x), chunk):
        block = x[start : start + chunk]
        scores = q @ block.T
        if allowed is not None:
            scores[:, ~allowed[start : start + len(block)]] = -np.inf
        s = np.concatenate([best_s, scores], axis=1)  # (nq, k + chunk)
        i = np.concatenate(
            [best_i, np.broadcast_to(np.arange(start, start + len(block)), (len(q), len(block)))], 1
        )
        kk = min(k, s.shape[1])
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    order = np.lexsort((best_i, -best_s), axis=1)
    best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
    if allowed is not None:
        best_i[~np.isfinite(best_s)] = -1
    return best_s, best_i


class SearchIndex:
    def __init__(
        self,
        index_dir: Path,
        manifest: dict[str, Any],
        checkpoint: Path,
        device: str,
        mmap: bool | None = None,
        shards: list[int] | None = None,
        onnx: OnnxTowers | None = None,
    ):
        self.index_dir = index_dir
        self.manifest = manifest
        self.checkpoint = checkpoint
        self.device = device
        self.modalities: list[str] = list(manifest["modalities"])
        self.embed_dim: int = int(manifest["embed_dim"])
        self.report = read_report(index_dir)
        # Memory-mapped indexes and embeddings: `coalign index --mmap` stores the choice with the index.
        self.mmap = bool(self.report.get("mmap", False)) if mmap is None else bool(mmap)
        # An Arrow table, memory-mapped when `coalign index` wrote index/metadata.arrow: a hit reads its
        # own row, never the whole table (nor a Python list per column).
        self._meta = open_metadata(index_dir).select(["row", "id", "path", "caption", "labels"])
        rows = self._meta.column("row").to_numpy()
        if not np.array_equal(rows, np.arange(len(rows))):
            raise ValueError(f"'{index_dir / METADATA}' rows are not 0..n-1; re-run `coalign embed`")
        self.shards = shards  # of a sharded index, the parts this process searches (None: all)
        self.onnx = onnx  # encode queries with these onnxruntime towers instead of torch
        self._lock = threading.Lock()
        self._labels: LabelIndex | None = None
        self._run = None
        self._searchers: dict[str, Any] = {}

    @classmethod
    def load(
        cls,
        index_dir: str | Path,
        checkpoint: str | Path | None = None,
        device: str = "cpu",
        mmap: bool | None = None,
        shards: list[int] | None = None,
        onnx: str | Path | None = None,
    ) -> SearchIndex:
        """index_dir is the folder `coalign embed` wrote (and `coalign index` added index/ to). The
        checkpoint defaults to the one recorded in index_dir/manifest.json. `mmap`: memory-map the
        FAISS index (or, without one, the embedding shards) instead of reading it into memory; None:
        as `coalign index --mmap` recorded. `shards`: of an index built with --shards, the parts to
        search (a worker serving part of the corpus; default all). `onnx`: a folder from `coalign
        export onnx` whose towers encode the queries (the run still gives the transforms)."""
        index_dir = Path(index_dir).resolve()
        manifest = finished_manifest(index_dir)
        towers = None
        if onnx is not None:
            from coalign.search.onnx_towers import OnnxTowers

            towers = OnnxTowers(onnx, threads=torch.get_num_threads())
        checkpoint = Path(checkpoint or manifest["checkpoint"])
        index = cls(index_dir, manifest, checkpoint, device, mmap, shards, towers)
        index.shard_info()  # a bad --shards fails here, before any query
        return index

    def shard_info(self) -> dict[str, list[int] | int] | None:
        """Of an index built with --shards: {"served": the parts this process searches, "total": how
        many there are}; None for a single-file index. Refuses parts that do not exist, and --shards
        over an index that is not sharded."""
        layouts = [read_layout(self.index_dir, m) for m in self.modalities]
        total = next((len(lay["parts"]) for lay in layouts if lay is not None), None)
        if total is None:
            if self.shards is not None:
                raise ConfigError(
                    f"--shards {' '.join(map(str, self.shards))}: '{self.index_dir}' has no sharded index; "
                    f"build one with `coalign index {self.index_dir} --shards N`"
                )
            return None
        served = list(range(total)) if self.shards is None else sorted(self.shards)
        bad = [s for s in served if not (isinstance(s, int) and 0 <= s < total)]
        if bad or not served or len(set(served)) != len(served):
            raise ConfigError(
                f"--shards {' '.join(map(str, self.shards or []))}: the index in '{self.index_dir}' has "
                f"parts 0..{total - 1}; give distinct ones of them"
            )
        return {"served": served, "total": total}

    def __len__(self) -> int:
        return self._meta.num_rows

    def _row_of(self, id: Any) -> int | None:
        """The first row holding `id` (a source may repeat ids), or None."""
        if not isinstance(id, str):
            return None
        row = pc.index(self._meta.column("id"), id).as_py()
        return None if row < 0 else row

    # ------------------------------------------------------------------------------------- encoding

    def loaded_run(self):
        """The run that embeds queries (and re-ranks, and captions), loaded on first use, once."""
        with self._lock:
            if self._run is None:
                from coalign.build import load_run  # here, so that loading an index stays fast

                run = load_run(self.checkpoint, Runtime.create("fp32", self.device))
                if run.model.embed_dim != self.embed_dim:
                    raise ConfigError(
                        f"checkpoint '{self.checkpoint}' embeds to {run.model.embed_dim} dimensions but "
                        f"'{self.index_dir}' holds {self.embed_dim}-dimensional embeddings"
                    )
                if self.onnx is not None and self.onnx.step not in (None, run.step):
                    raise ConfigError(
                        f"--onnx '{self.onnx.folder}' was exported at step {self.onnx.step} but the served "
                        f"checkpoint '{self.checkpoint}' is step {run.step}: export it again"
                    )
                self._run = run
            return self._run

    @torch.no_grad()
    def _encode(self, modality: str, x: torch.Tensor) -> np.ndarray:
        run = self.loaded_run()
        if self.onnx is not None:
            return self.onnx.encode(modality, x.cpu().numpy(), self.embed_dim)
        return run.model.encode(modality, x.to(self.device)).float().cpu().numpy()

    def _transform(self, modality: str):
        run = self.loaded_run()
        if modality not in run.model.modalities or modality not in run.transforms:
            raise ConfigError(
                f"the model cannot encode '{modality}'; it encodes {', '.join(run.model.modalities)}"
            )
        return run.transforms[modality]

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """(n, E) float32, normalised. An empty or blank text raises SampleError('empty_caption')."""
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings, not one string")
        transform = self._transform("text")
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        if any(not isinstance(t, str) or not t.strip() for t in texts):
            raise SampleError("empty_caption", "a query text is empty")
        return self._encode("text", transform.encode(list(texts)))

    def encode_image(self, images: list) -> np.ndarray:
        """(n, E) float32, normalised. Items: bytes, PIL image, uint8 array or path; an undecodable
        item raises SampleError."""
        transform = self._transform("image")
        if not images:
            return np.zeros((0, self.embed_dim), np.float32)
        rng = np.random.default_rng(0)  # eval transforms are deterministic; the argument is required
        return self._encode("image", torch.stack([transform(img, rng) for img in images]))

    # -------------------------------------------------------------------------------------- search

    def _searcher(self, modality: str):
        """The FAISS index of `modality`, or its stored vectors (float32) for exact search."""
        if modality not in self.modalities:
            raise ConfigError(
                f"no '{modality}' embeddings in '{self.index_dir}'; "
                f"searchable modalities: {', '.join(self.modalities)}"
            )
        with self._lock:
            if modality not in self._searchers:
                path = index_path(self.index_dir, modality)
                layout = read_layout(self.index_dir, modality)
                if not path.is_file() and layout is not None:
                    if layout["parts"][-1]["stop"] != len(self):
                        raise ConfigError(
                            f"the sharded index of '{self.index_dir}' covers {layout['parts'][-1]['stop']} "
                            f"items but the folder has {len(self)}: run `coalign index` again"
                        )
                    index, _ = open_sharded(self.index_dir, modality, layout, self.shards, self.mmap)
                    self._searchers[modality] = index
                elif path.is_file():
                    import faiss

                    # IO_FLAG_MMAP_IFC maps the codes of flat, IVF, HNSW and re-ranking indexes alike
                    flags = faiss.IO_FLAG_MMAP_IFC if self.mmap else 0
                    index = faiss.read_index(str(path), flags)
                    if index.ntotal != len(self):
                        raise ConfigError(
                            f"'{path}' holds {index.ntotal} vectors but '{self.index_dir}' has {len(self)} "
                            f"items: the index is stale; run `coalign index {self.index_dir}` again "
                            "(with --add when rows were only appended)"
                        )
                    params = self.report.get("modalities", {}).get(modality, {}).get("search_params", "")
                    apply_search_params(index, params)
                    self._searchers[modality] = index
                else:
                    load = open_embeddings if self.mmap else load_embeddings
                    self._searchers[modality] = load(self.index_dir, self.manifest, modality)
            return self._searchers[modality]

    def encode_query(
        self,
        text: str | None = None,
        image: Any = None,
        weights: tuple[float, float] = (0.5, 0.5),
        combine: str = "sum",
    ) -> np.ndarray:
        """(1, E): one query from a text and an image. "sum": the weighted sum of their normalised
        embeddings (composed queries: "this picture, but red"); "product": their elementwise product,
        so that the inner product with a stored item is Symile's multilinear score of the three
        (retrieval given the rest)."""
        if combine not in COMBINE:
            raise ConfigError(f"combine must be 'sum' or 'product', got '{combine}'")
        if text is None and image is None:
            raise ConfigError("a query needs a text, an image or both")
        parts, w = [], []
        if text is not None:
            parts.append(self.encode_text([text])[0])
            w.append(weights[0])
        if image is not None:
            parts.append(self.encode_image([image])[0])
            w.append(weights[1])
        return combine_vectors(parts, w, combine)

    def _label_index(self) -> LabelIndex:
        with self._lock:
            if self._labels is None:
                self._labels = LabelIndex(self._meta.column("labels").to_pylist())
        return self._labels

    def label_names(self) -> list[str]:
        """The labels a filter may name (the served schema lists exactly these)."""
        return list(self._label_index().codes)

    def _filtered(self, searcher, q: np.ndarray, k: int, modality: str, filter: Any):
        """(scores, rows) over the items matching `filter` only (coalign.search.filters)."""
        rows = self._label_index().rows(filter)
        if isinstance(searcher, ShardedIndex):  # a worker: only the rows of its own parts
            starts = np.array(searcher.starts)
            stops = starts + np.array([p.ntotal for p in searcher.parts])
            rows = rows[((rows[:, None] >= starts) & (rows[:, None] < stops)).any(axis=1)]
        if isinstance(searcher, np.ndarray | ShardRows):
            mask = np.zeros(len(self), dtype=bool)
            mask[rows] = True
            return exact_search(searcher, q, k, allowed=mask)
        if len(rows) <= PREFILTER_MAX:  # few candidates: score exactly those rows
            vectors = open_embeddings(self.index_dir, self.manifest, modality).take(rows)
            scores, idx = exact_search(vectors, q, min(k, len(rows))) if len(rows) else (None, None)
            if scores is None:
                return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
            return scores, rows[idx]
        if isinstance(searcher, ShardedIndex):
            mask = np.zeros(len(self), dtype=bool)
            mask[rows] = True
            return searcher.search(q, k, allowed=mask)
        return selector_search(searcher, q, k, rows, len(self))

    def search(
        self, vectors: np.ndarray, k: int, modality: str = "image", filter: dict | None = None
    ) -> list[list[Hit]]:
        """The k nearest stored `modality` items of each query row (cosine similarity), best first;
        with `filter` ({label: value or [values]}), only among the items whose labels match."""
        q = np.asarray(vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.embed_dim:
            raise ValueError(f"query vectors must have shape (n, {self.embed_dim}), got {tuple(q.shape)}")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        q = np.ascontiguousarray(q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12))
        searcher = self._searcher(modality)
        k = min(k, len(self))
        if len(q) == 0 or k == 0:
            return [[] for _ in range(len(q))]
        if filter is not None:
            scores, rows = self._filtered(searcher, q, k, modality, filter)
        elif isinstance(searcher, np.ndarray | ShardRows):
            scores, rows = exact_search(searcher, q, k)
        else:
            scores, rows = searcher.search(q, k)
        return [self._hits(rrow, srow) for srow, rrow in zip(scores, rows, strict=True)]

    def _hits(self, rows, scores) -> list[Hit]:
        """Hits of the given rows (-1: none), their metadata read in one take of just those rows."""
        keep = [(int(r), float(s)) for r, s in zip(rows, scores, strict=True) if r >= 0]
        meta = self._meta.take([r for r, _ in keep]).to_pylist() if keep else []
        return [
            Hit(
                id=m["id"],
                score=s,
                row=r,
                caption=m["caption"],
                path=m["path"],
                labels=json.loads(m["labels"] or "{}"),
            )
            for (r, s), m in zip(keep, meta, strict=True)
        ]

    def item(self, id: str) -> Hit | None:
        """The metadata of item `id` (score 0), or None if no such item."""
        row = self._row_of(id)
        return None if row is None else self._hits([row], [0.0])[0]

    def thumbnail_path(self, id: str) -> Path | None:
        """The item's thumbnail, a file inside index_dir, or None. The path is built from the row number
        found in the metadata, never from `id` itself, so no id can point outside the folder."""
        row = self._row_of(id)
        if row is None:
            return None
        path = thumbnail_file(self.index_dir, row).resolve()
        if not path.is_relative_to(self.index_dir) or not path.is_file():
            return None  # a symlinked thumbnails/ pointing elsewhere is refused too
        return path

    def info(self) -> dict[str, Any]:
        """What is indexed: counts, index types, checkpoint (for a server's status page)."""
        kinds = {
            m: self.report.get("modalities", {}).get(m, {}).get("type", "exact") for m in self.modalities
        }
        return {
            "items": len(self),
            "modalities": self.modalities,
            "embed_dim": self.embed_dim,
            "index": kinds,
            "checkpoint": str(self.checkpoint),
            "source": self.manifest["source"],
        }
