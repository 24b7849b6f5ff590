"""Building from memory-mapped embeddings (coalign.search.ShardRows): `coalign index` reads the float16
shards in bounded chunks, never every row at once, and builds what the in-memory build of the same rows
builds: the same index answers, the same recall, the same tuned choice."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from coalign.search import (
    ShardRows,
    load_embeddings,
    open_embeddings,
    read_manifest,
    take_rows,
)
from coalign.search import holdout as holdout_mod
from coalign.search import index as index_mod
from coalign.search import tune as tune_mod
from coalign.search.index import build, recall_at_k
from coalign.search.query import SearchIndex
from coalign.search.tune import Tuner, tune
from test_search import fake_embedding
from test_search_tune import blobs

SIZES = (700, 1100, 37, 1163)  # uneven shards: chunks cross their boundaries


def embedding(out, x: np.ndarray, sizes=SIZES):
    """An OUT folder as `coalign embed` leaves it, with x split over several float16 shards."""
    return fake_embedding(out, x, sizes)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 256 rows, so that every add, assignment and ground-truth scan takes many steps."""
    monkeypatch.setattr(index_mod, "ADD_CHUNK", 256)
    monkeypatch.setattr(holdout_mod, "CHUNK", 256)
    monkeypatch.setattr(tune_mod, "CHUNK", 256)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # HNSW's graph depends on the insertion order of parallel adds
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture
def reads(monkeypatch):
    """The number of rows of every read from a ShardRows."""
    seen: list[int] = []
    get, take = ShardRows.__getitem__, ShardRows.take

    def getitem(self, rows):
        out = get(self, rows)
        seen.append(len(out))
        return out

    def take_(self, rows):
        out = take(self, rows)
        seen.append(len(out))
        return out

    monkeypatch.setattr(ShardRows, "__getitem__", getitem)
    monkeypatch.setattr(ShardRows, "take", take_)
    return seen


def test_shard_rows_read_exactly_the_loaded_rows(tmp_path):
    out = embedding(tmp_path, blobs(3000))
    manifest = read_manifest(out)
    x, rows = load_embeddings(out, manifest, "image"), open_embeddings(out, manifest, "image")
    assert rows.shape == x.shape
    assert np.array_equal(rows[650:1850], x[650:1850])  # across three shards
    pick = np.random.default_rng(0).permutation(3000)[:500]  # any order
    assert np.array_equal(rows.take(pick), x[pick])
    assert np.array_equal(take_rows(rows, np.arange(690, 1810)), x[690:1810])
    part = rows.view(1790, 2900)
    assert part.shape == (1110, 32) and np.array_equal(part[5:100], x[1795:1890])
    assert np.array_equal(part.take(np.array([1, 0, 1109])), x[[1791, 1790, 2899]])


def one_shot(x: np.ndarray, factory: str, seed: int = 0) -> faiss.Index:
    """The build before chunking: the whole array in one add (build's training sample)."""
    index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        wanted = max(64 * (ivf.nlist if ivf is not None else 1), 256 * 64)
        index.train(x[np.sort(np.random.default_rng(seed).permutation(len(x))[:wanted])])
    index.add(x)
    return index


@pytest.mark.parametrize("factory", ["Flat", "IVF32,PQ8x4np", "IVF32,SQ8", "IVF16,PQ4x4np,RFlat", "HNSW16"])
def test_memory_mapped_build_equals_the_in_memory_build(tmp_path, small_chunks, reads, factory):
    out = embedding(tmp_path, blobs(3000))
    manifest = read_manifest(out)
    x, rows = load_embeddings(out, manifest, "image"), open_embeddings(out, manifest, "image")
    mapped = build(rows, factory)
    assert 0 < max(reads) <= 3000 and reads.count(256) >= 10  # the adds went chunk by chunk
    reference = build(x, factory) if factory.startswith("HNSW") else one_shot(x, factory)
    q = blobs(100, seed=5)
    for index in (mapped, reference):
        index_mod.apply_search_params(index, index_mod.search_params(index))
    d1, i1 = mapped.search(q, 10)
    d2, i2 = reference.search(q, 10)
    assert np.array_equal(i1, i2) and np.allclose(d1, d2, atol=1e-6)
    queries = np.arange(0, 3000, 7)
    assert recall_at_k(mapped, rows, queries, 10) == recall_at_k(reference, x, queries, 10)


def test_tuning_from_the_shards_equals_tuning_in_memory(tmp_path, small_chunks, reads):
    out = embedding(tmp_path, blobs(3000))
    manifest = read_manifest(out)
    x, rows = load_embeddings(out, manifest, "image"), open_embeddings(out, manifest, "image")
    kinds = ("ivf-sq8", "ivf-pq-refine")
    mapped, loaded = Tuner(rows, queries=200, kinds=kinds), Tuner(x, queries=200, kinds=kinds)
    a, b = mapped.run([0.9])[0.9], loaded.run([0.9])[0.9]
    # Held-out queries and the kept rows' sample come in whole, everything else in chunks of 256.
    assert reads and max(reads) < 3000 and reads.count(256) >= 20
    same = ("name", "status", "params", "recall", "recall_bound", "best_recall", "best_bound")
    assert [{k: r.get(k) for k in same} for r in a] == [{k: r.get(k) for k in same} for r in b]
    assert [r["status"] for r in a] == ["reaches target"] * 2
    q = blobs(100, seed=5)
    for row in a:  # each candidate's final build over every row answers alike (the choice is by latency)
        (index_a, _), (index_b, _) = mapped.final(row), loaded.final(row)
        d1, i1 = index_a.search(q, 10)
        d2, i2 = index_b.search(q, 10)
        assert index_a.ntotal == 3000 and np.array_equal(i1, i2) and np.allclose(d1, d2, atol=1e-6)


@pytest.mark.parametrize("extra", [[], ["--recall", "0.9", "--candidates", "ivf-sq8"]])
def test_index_command_builds_from_the_shards(tmp_path, small_chunks, reads, extra):
    """`coalign index` (plain, tuned, sharded, then --add) over a 4-shard folder answers as the
    same indexes built from the loaded rows."""
    from coalign.cli.search import build_parser

    x0 = blobs(3000)
    out = embedding(tmp_path, x0)
    x = load_embeddings(out, read_manifest(out), "image")
    parser = build_parser()
    argv = ["index", str(out), "--sample-queries", "200", "--no-progress", *extra]
    assert parser.parse_args(argv).func(parser.parse_args(argv)) == 0
    assert max(reads) < 3000  # never every row at once
    entry = json.loads((out / "index" / "report.json").read_text())["modalities"]["image"]
    if extra:
        _, ref = tune(x, 0.9, queries=200, kinds=("ivf-sq8",))
        assert entry["recall@10"] == ref["recall@10"] and entry["search_params"] == ref["search_params"]
        assert entry["recall_bound"] == ref["recall_bound"] >= 0.9
    else:  # 3000 rows: the rule's Flat; recall over the same sample queries
        assert entry["type"] == "flat" and entry["recall@10"] == 1.0
    q = blobs(50, seed=9)
    loaded = SearchIndex.load(out)
    hits = loaded.search(q, 10)
    flat = faiss.IndexFlatIP(32)
    flat.add(x)
    truth = flat.search(q, 10)[1]
    found = np.array([[int(h.id[1:]) for h in row] for row in hits])
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)]) >= 0.85
    # --shards 2: each part built from its own rows of the memmap
    argv2 = [*argv, "--shards", "2"]
    assert parser.parse_args(argv2).func(parser.parse_args(argv2)) == 0
    parts = json.loads((out / "index" / "report.json").read_text())["modalities"]["image"]["part_reports"]
    assert [(p["start"], p["stop"]) for p in parts] == [(0, 1500), (1500, 3000)]
    for p in parts:
        index = faiss.read_index(str(out / "index" / "image" / p["file"]))
        assert index.ntotal == 1500
        if extra:
            ref_index, ref = tune(x[p["start"] : p["stop"]], 0.9, queries=200, kinds=("ivf-sq8",))
        else:
            ref_index = build(x[p["start"] : p["stop"]], p["factory"])
        index_mod.apply_search_params(ref_index, p["search_params"])
        index_mod.apply_search_params(index, p["search_params"])
        assert np.array_equal(index.search(q, 10)[1], ref_index.search(q, 10)[1])
