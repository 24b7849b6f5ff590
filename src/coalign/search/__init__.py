"""Search: embed a source with a trained run (embed.py), index the embeddings (index.py), query them
(query.py). This module holds the on-disk layout all three share; `coalign embed OUT` writes:

    OUT/manifest.json                          checkpoint, source spec, embed_dim, modalities, shards
    OUT/embeddings/<modality>/shard_XXXXX.npy  float16 (rows, E), L2-normalised; rows align across modalities
    OUT/metadata/part_XXXXX.parquet            one shard's rows: row, id, path, caption, labels, source_index
    OUT/metadata.parquet                       every part merged, once all shards are done
    OUT/thumbnails/<row>.png                   a small PNG per item, so a server never reads outside OUT
    OUT/index/<modality>.faiss, report.json    written by `coalign index`
    OUT/index/metadata.arrow                   the metadata as an uncompressed Arrow file, written by
                                               `coalign index`: memory-mapped, so a query reads only its rows
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
METADATA_ARROW = "index/metadata.arrow"
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


class ShardRows:
    """The (n, E) rows of one modality's shards, memory-mapped: slicing a range reads only those rows
    and returns them as float32, re-normalised. Exact search scans it in chunks, so the embeddings
    never need to fit in memory."""

    def __init__(self, parts: list[np.ndarray], dim: int):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.starts[-1]), dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(len(self))
        if step != 1:
            raise IndexError("ShardRows takes contiguous ranges only")
        out = []
        for i, part in enumerate(self.parts):
            a, b = max(start, self.starts[i]), min(stop, self.starts[i + 1])
            if a < b:
                out.append(part[a - self.starts[i] : b - self.starts[i]])
        x = np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.shape[1]), np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def view(self, start: int, stop: int) -> ShardRows:
        """Rows start..stop-1 as a ShardRows of their own (memmap slices: nothing is read)."""
        parts = []
        for i, part in enumerate(self.parts):
            a, b = max(start, self.starts[i]), min(stop, self.starts[i + 1])
            if a < b:
                parts.append(part[a - self.starts[i] : b - self.starts[i]])
        return ShardRows(parts, self.shape[1])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), E) float32, re-normalised: the given rows (int, any order) from their shards."""
        rows = np.asarray(rows, dtype=np.int64)
        part = np.searchsorted(self.starts, rows, side="right") - 1
        x = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        for i in np.unique(part):
            sel = part == i
            x[sel] = self.parts[i][rows[sel] - self.starts[i]]
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def take_rows(x: np.ndarray | ShardRows, rows: np.ndarray) -> np.ndarray:
    """x[rows] as a C-contiguous float32 array, for x in memory or a ShardRows (a contiguous run of rows
    is read as one range)."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
        return np.ascontiguousarray(x[int(rows[0]) : int(rows[-1]) + 1])
    return np.ascontiguousarray(x.take(rows) if isinstance(x, ShardRows) else x[rows])


def open_embeddings(out: Path, manifest: dict[str, Any], modality: str) -> ShardRows:
    """The rows `load_embeddings` returns, memory-mapped instead of loaded."""
    if modality not in manifest["modalities"]:
        raise ValueError(
            f"no '{modality}' embeddings in '{out}'; embedded modalities: {', '.join(manifest['modalities'])}"
        )
    shards = sorted(manifest["shards"], key=lambda s: s["shard"])
    parts = [np.load(shard_path(out, modality, s["shard"]), mmap_mode="r") for s in shards]
    return ShardRows(parts, int(manifest["embed_dim"]))


def write_metadata_arrow(out: Path) -> Path:
    """OUT/index/metadata.arrow from OUT/metadata.parquet, one row group at a time (never the whole
    table in memory), written to a temporary file and renamed."""
    import os
    import tempfile

    source = pq.ParquetFile(out / METADATA)
    path = out / METADATA_ARROW
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".metadata.")
    os.close(fd)
    try:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, source.schema_arrow) as writer:
            for group in range(source.num_row_groups):
                writer.write_table(source.read_row_group(group))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def open_metadata(out: Path) -> pa.Table:
    """The metadata table: memory-mapped from index/metadata.arrow when that is as new as the Parquet
    file and as long, else read from the Parquet file."""
    arrow, parquet = out / METADATA_ARROW, out / METADATA
    if arrow.is_file() and arrow.stat().st_mtime_ns >= parquet.stat().st_mtime_ns:
        table = pa.ipc.open_file(pa.memory_map(str(arrow), "r")).read_all()
        if table.num_rows == pq.ParquetFile(parquet).metadata.num_rows:
            return table
    return pq.read_table(parquet)
