"""Search at scale on one machine: memory-mapped indexes, embeddings and metadata answer like loaded
ones, and `coalign index --add` appends rows without a rebuild."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coalign.cli.search import build_parser
from coalign.registry import ConfigError
from coalign.search import (
    METADATA,
    METADATA_ARROW,
    ShardRows,
    metadata_schema,
    open_metadata,
    read_manifest,
    shard_path,
    write_manifest,
)
from coalign.search.index import add_to_index, build_index
from coalign.search.query import SearchIndex
from test_search import fake_embedding
from test_search_tune import blobs


def append_rows(out, x_new: np.ndarray) -> None:
    """What a later `coalign embed` shard adds: one more shard file, its metadata rows, the manifest."""
    manifest = read_manifest(out)
    shard = len(manifest["shards"])
    np.save(shard_path(out, "image", shard), x_new.astype(np.float16))
    old = pq.read_table(out / METADATA)
    n, m = old.num_rows, len(x_new)
    new = {
        "row": list(range(n, n + m)),
        "id": [f"new{i}" for i in range(m)],
        "path": [None] * m,
        "caption": [f"added {i}" for i in range(m)],
        "labels": ["{}"] * m,
        "source_index": list(range(n, n + m)),
    }
    table = pa.concat_tables([old, pa.table(new, schema=metadata_schema())])
    pq.write_table(table, out / METADATA)
    manifest["shards"].append({"shard": shard, "rows": m})
    manifest["num_shards"] = shard + 1
    write_manifest(out, manifest)


def answers(index: SearchIndex, q: np.ndarray, k: int = 10):
    return [[(h.id, round(h.score, 5), h.caption) for h in hits] for hits in index.search(q, k)]


@pytest.mark.parametrize("factory", ["IVF16,SQ8", "HNSW16", "IVF16,PQ4x4np,RFlat", None])
def test_memory_mapped_index_answers_like_the_loaded_one(tmp_path, factory):
    x = blobs(2000)
    out = fake_embedding(tmp_path, x)
    q = blobs(30, seed=5)
    if factory is None:  # no index: exact search over the shards, memory-mapped or loaded
        loaded, mapped = SearchIndex.load(out, mmap=False), SearchIndex.load(out, mmap=True)
        assert isinstance(mapped._searcher("image"), ShardRows)
        assert isinstance(mapped._searcher("image").parts[0], np.memmap)
    else:
        build_index(out, factory=factory, sample_queries=50, mmap=True)
        loaded, mapped = SearchIndex.load(out, mmap=False), SearchIndex.load(out)  # mmap as indexed
        assert mapped.mmap and not loaded.mmap
    assert answers(mapped, q) == answers(loaded, q)


def test_shard_rows_read_ranges_across_shards(tmp_path):
    x = blobs(50, d=8)
    parts = [x[:20].astype(np.float16), x[20:23].astype(np.float16), x[23:].astype(np.float16)]
    rows = ShardRows(parts, 8)
    assert rows.shape == (50, 8) and len(rows) == 50
    whole = np.concatenate(parts).astype(np.float32)
    whole /= np.linalg.norm(whole, axis=1, keepdims=True)
    for a, b in [(0, 50), (18, 24), (21, 22), (45, 80), (30, 30)]:
        np.testing.assert_allclose(rows[a:b], whole[a:b], rtol=1e-6)
    with pytest.raises(IndexError, match="contiguous"):
        rows[::2]


def test_metadata_is_memory_mapped_arrow_and_stays_fresh(tmp_path):
    x = blobs(300)
    out = fake_embedding(tmp_path, x)
    build_index(out)
    assert (out / METADATA_ARROW).is_file()
    mapped = open_metadata(out)
    assert mapped.equals(pq.read_table(out / METADATA))
    # Memory-mapped: the table's buffers live in the file's mapping, not in a copy.
    buf = mapped.column("id").chunks[0].buffers()[-1]
    assert not buf.is_mutable
    index = SearchIndex.load(out)
    assert index.item("v7").row == 7 and index.item("v7").score == 0 and index.item("nope") is None
    # A Parquet file newer than the Arrow copy wins (the Arrow copy is stale).
    table = pq.read_table(out / METADATA)
    table = table.set_column(3, "caption", pa.array([f"c{i}" for i in range(300)]))
    pq.write_table(table, out / METADATA)
    assert open_metadata(out).column("caption")[4].as_py() == "c4"


def test_add_appends_without_a_rebuild(tmp_path, capsys):
    x = blobs(2000)
    out = fake_embedding(tmp_path, x)
    build_index(out, factory="IVF16,Flat", sample_queries=50)
    before = faiss.read_index(str(out / "index" / "image.faiss"))
    centroids = before.quantizer.reconstruct_n(0, 16)
    x_new = blobs(300, seed=9)
    append_rows(out, x_new)
    with pytest.raises(ConfigError, match="stale.*--add"):
        SearchIndex.load(out).search(x_new[:1], 3)
    args = build_parser().parse_args(["index", str(out), "--add", "--no-progress"])
    assert args.func(args) == 0
    assert "added 300 rows, now 2300" in capsys.readouterr().out
    after = faiss.read_index(str(out / "index" / "image.faiss"))
    assert after.ntotal == 2300
    np.testing.assert_array_equal(after.quantizer.reconstruct_n(0, 16), centroids)  # not retrained
    report = json.loads((out / "index" / "report.json").read_text())["modalities"]["image"]
    assert report["n"] == 2300 and report["additions"][-1]["rows"] == 300
    index = SearchIndex.load(out)
    faiss.downcast_index(index._searcher("image")).nprobe = 16  # exhaustive: compare with exact search
    hits = index.search(x_new[[0, 123, 299]], 3)
    assert [h[0].id for h in hits] == ["new0", "new123", "new299"]
    assert hits[1][0].caption == "added 123"
    # Nothing new: a second --add adds nothing; --add with build options is refused.
    assert add_to_index(out)["modalities"]["image"]["additions"][-1]["rows"] == 0
    args = build_parser().parse_args(["index", str(out), "--add", "--recall", "0.9"])
    with pytest.raises(ConfigError, match="drop --recall"):
        args.func(args)


def test_add_needs_an_index(tmp_path):
    out = fake_embedding(tmp_path, blobs(100))
    with pytest.raises(ConfigError, match="no index to add to"):
        add_to_index(out)
