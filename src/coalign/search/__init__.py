"""Search: embed a source with a trained run (embed.py), index the embeddings (index.py), query them
(query.py). This module holds the on-disk layout all three share; `coalign embed OUT` writes:

    OUT/manifest.json                          checkpoint, source spec, embed_dim, modalities, shards
    OUT/embeddings/<modality>/shard_XXXXX.npy  float16 (rows, E), L2-normalised; rows align across modalities
    OUT/metadata/part_XXXXX.parquet            one shard's rows: row, id, path, caption, labels, source_index
    OUT/metadata.parquet                       every part merged, once all shards are done
    OUT/thumbnails/<row>.png                   a small PNG per item, so a server never reads outside OUT
    OUT/index/<modality>.faiss, report.json    written by `coalign index`
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from coalign.io import atomic_write_bytes, atomic_write_text

MANIFEST = "manifest.json"
METADATA = "metadata.parquet"
FORMAT = 1


def shard_path(out: Path, modality: str, shard: int) -> Path:
    return out / "embeddings" / modality / f"shard_{shard:05d}.npy"


def part_path(out: Path, shard: int) -> Path:
    return out / "metadata" / f"part_{shard:05d}.parquet"


def thumbnail_file(out: Path, row: int) -> Path:
    return out / "thumbnails" / f"{int(row)}.png"


def index_path(out: Path, modality: str) -> Path:
    return out / "index" / f"{modality}.faiss"


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def metadata_schema() -> pa.Schema:
    """The metadata columns; `labels` is a JSON object string, `path` the original file (None for arrays)."""
    names = ("row", "id", "path", "caption", "labels", "source_index")
    types = (pa.int64(), pa.string(), pa.string(), pa.string(), pa.string(), pa.int64())
    return pa.schema(list(zip(names, types, strict=True)))


def write_parquet(path: Path, table: pa.Table) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue())


def read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))


def finished_manifest(out: Path) -> dict[str, Any]:
    """The manifest of a completed `coalign embed`, or an error saying what to run."""
    out = Path(out)
    manifest = read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(
            f"no embeddings in '{out}' (no {MANIFEST}); run `coalign embed CHECKPOINT SOURCE {out}` first"
        )
    if not manifest.get("finished"):
        done, total = len(manifest.get("shards", [])), manifest.get("num_shards", "?")
        raise FileNotFoundError(
            f"the embedding in '{out}' is unfinished ({done} of {total} shards); run the same "
            f"`coalign embed` command again to resume it"
        )
    return manifest


def load_embeddings(out: Path, manifest: dict[str, Any], modality: str) -> np.ndarray:
    """(n, E) float32, rows in metadata order, re-normalised after the float16 round trip."""
    if modality not in manifest["modalities"]:
        raise ValueError(
            f"no '{modality}' embeddings in '{out}'; embedded modalities: {', '.join(manifest['modalities'])}"
        )
    shards = sorted(manifest["shards"], key=lambda s: s["shard"])
    parts = [np.load(shard_path(out, modality, s["shard"])) for s in shards]
    x = np.concatenate(parts) if parts else np.zeros((0, manifest["embed_dim"]), np.float16)
    x = x.astype(np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12))
