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
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from coalign.data.sources.base import SampleError
from coalign.registry import ConfigError
from coalign.runtime import Runtime
from coalign.search import METADATA, finished_manifest, index_path, load_embeddings, thumbnail_file
from coalign.search.index import apply_search_params, read_report


@dataclass
class Hit:
    id: str
    score: float
    row: int
    caption: str | None
    path: str | None
    labels: dict[str, int]


def exact_search(x: np.ndarray, q: np.ndarray, k: int, chunk: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows), each (nq, k), best first (equal scores: lower row first); x is scanned in chunks
    so that a million rows never need an (nq, n) score matrix."""
    best_s = np.zeros((len(q), 0), dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for start in range(0, len(x), chunk):
        block = x[start : start + chunk]
        s = np.concatenate([best_s, q @ block.T], axis=1)  # (nq, k + chunk)
        i = np.concatenate(
            [best_i, np.broadcast_to(np.arange(start, start + len(block)), (len(q), len(block)))], 1
        )
        kk = min(k, s.shape[1])
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    order = np.lexsort((best_i, -best_s), axis=1)
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


class SearchIndex:
    def __init__(self, index_dir: Path, manifest: dict[str, Any], checkpoint: Path, device: str):
        self.index_dir = index_dir
        self.manifest = manifest
        self.checkpoint = checkpoint
        self.device = device
        self.modalities: list[str] = list(manifest["modalities"])
        self.embed_dim: int = int(manifest["embed_dim"])
        self.report = read_report(index_dir)
        table = pq.read_table(index_dir / METADATA, columns=["row", "id", "path", "caption", "labels"])
        self._ids: list[str] = table.column("id").to_pylist()
        self._paths: list[str | None] = table.column("path").to_pylist()
        self._captions: list[str | None] = table.column("caption").to_pylist()
        self._labels: list[str] = table.column("labels").to_pylist()
        if table.column("row").to_pylist() != list(range(len(self._ids))):
            raise ValueError(f"'{index_dir / METADATA}' rows are not 0..n-1; re-run `coalign embed`")
        # The first row of an id wins (a source may repeat ids); ids are only ever looked up here.
        self._row_of: dict[str, int] = {}
        for row, id_ in enumerate(self._ids):
            self._row_of.setdefault(id_, row)
        self._lock = threading.Lock()
        self._run = None
        self._searchers: dict[str, Any] = {}

    @classmethod
    def load(
        cls, index_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu"
    ) -> SearchIndex:
        """index_dir is the folder `coalign embed` wrote (and `coalign index` added index/ to). The
        checkpoint defaults to the one recorded in index_dir/manifest.json."""
        index_dir = Path(index_dir).resolve()
        manifest = finished_manifest(index_dir)
        return cls(index_dir, manifest, Path(checkpoint or manifest["checkpoint"]), device)

    def __len__(self) -> int:
        return len(self._ids)

    # ------------------------------------------------------------------------------------- encoding

    def _loaded_run(self):
        with self._lock:
            if self._run is None:
                from coalign.build import load_run  # here, so that loading an index stays fast

                run = load_run(self.checkpoint, Runtime.create("fp32", self.device))
                if run.model.embed_dim != self.embed_dim:
                    raise ConfigError(
                        f"checkpoint '{self.checkpoint}' embeds to {run.model.embed_dim} dimensions but "
                        f"'{self.index_dir}' holds {self.embed_dim}-dimensional embeddings"
                    )
                self._run = run
            return self._run

    @torch.no_grad()
    def _encode(self, modality: str, x: torch.Tensor) -> np.ndarray:
        run = self._loaded_run()
        return run.model.encode(modality, x.to(self.device)).float().cpu().numpy()

    def _transform(self, modality: str):
        run = self._loaded_run()
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
                if path.is_file():
                    import faiss

                    index = faiss.read_index(str(path))
                    if index.ntotal != len(self):
                        raise ConfigError(
                            f"'{path}' holds {index.ntotal} vectors but '{self.index_dir}' has {len(self)} "
                            f"items: the index is stale; run `coalign index {self.index_dir}` again"
                        )
                    params = self.report.get("modalities", {}).get(modality, {}).get("search_params", "")
                    apply_search_params(index, params)
                    self._searchers[modality] = index
                else:
                    self._searchers[modality] = load_embeddings(self.index_dir, self.manifest, modality)
            return self._searchers[modality]

    def search(self, vectors: np.ndarray, k: int, modality: str = "image") -> list[list[Hit]]:
        """The k nearest stored `modality` items of each query row (cosine similarity), best first."""
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
        if isinstance(searcher, np.ndarray):
            scores, rows = exact_search(searcher, q, k)
        else:
            scores, rows = searcher.search(q, k)
        return [
            [self._hit(int(r), float(s)) for s, r in zip(srow, rrow, strict=True) if r >= 0]
            for srow, rrow in zip(scores, rows, strict=True)
        ]

    def _hit(self, row: int, score: float) -> Hit:
        return Hit(
            id=self._ids[row],
            score=score,
            row=row,
            caption=self._captions[row],
            path=self._paths[row],
            labels=json.loads(self._labels[row] or "{}"),
        )

    def item(self, id: str) -> Hit | None:
        """The metadata of item `id` (score 0), or None if no such item."""
        row = self._row_of.get(id) if isinstance(id, str) else None
        return None if row is None else self._hit(row, 0.0)

    def thumbnail_path(self, id: str) -> Path | None:
        """The item's thumbnail, a file inside index_dir, or None. The path is built from the row number
        found in the metadata, never from `id` itself, so no id can point outside the folder."""
        row = self._row_of.get(id) if isinstance(id, str) else None
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
