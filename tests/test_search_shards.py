"""Sharded indexes: N parts searched in parallel and merged answer like one index; a worker serving
some parts answers for its rows, and merging the workers' hits gives the whole answer."""

from __future__ import annotations

import json

import pytest

from coalign.registry import ConfigError
from coalign.search.index import build_index
from coalign.search.query import SearchIndex
from coalign.search.shards import merge_hits, part_ranges, read_layout
from test_search import fake_embedding
from test_search_filters import labelled
from test_search_tune import blobs


def assert_same_answers(got, want, atol: float = 1e-5) -> None:
    """The same rows in the same order for every query, and scores equal up to float rounding: one
    index and its parts add the same products in other orders (rounding the scores to 5 decimals
    instead would fail wherever a score sits at a rounding boundary)."""
    assert [[h.row for h in hq] for hq in got] == [[h.row for h in hq] for hq in want]
    for g, w in zip(got, want, strict=True):
        assert all(abs(a.score - b.score) <= atol for a, b in zip(g, w, strict=True)), (g, w)


def test_part_ranges():
    assert part_ranges(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert part_ranges(5, 5) == [(i, i + 1) for i in range(5)]
    with pytest.raises(ConfigError, match="--shards must be between 1 and the number of items"):
        part_ranges(5, 6)


def test_sharded_index_answers_like_one_index(tmp_path):
    x = blobs(1500)
    q = blobs(25, seed=4)
    for name in ("one", "many", "l"):
        (tmp_path / name).mkdir()
    one, many = fake_embedding(tmp_path / "one", x), fake_embedding(tmp_path / "many", x)
    build_index(one, factory="Flat", sample_queries=20)
    report = build_index(many, factory="Flat", sample_queries=20, shards=3)
    entry = report["modalities"]["image"]
    assert entry["type"] == "sharded" and entry["parts"] == 3 and entry["n"] == 1500
    layout = read_layout(many, "image")
    assert [(p["start"], p["stop"]) for p in layout["parts"]] == [(0, 500), (500, 1000), (1000, 1500)]
    assert not (many / "index" / "image.faiss").exists()
    single, sharded = SearchIndex.load(one), SearchIndex.load(many)
    assert_same_answers(sharded.search(q, 10), single.search(q, 10))
    # Filters reach every part.
    out_l, _, shape, _ = labelled(tmp_path / "l")
    build_index(out_l, factory="Flat", sample_queries=20, shards=4)
    hits = SearchIndex.load(out_l).search(q, 10, filter={"shape": 2})
    assert all(shape[h.row] == 2 for hq in hits for h in hq) and all(len(hq) == 10 for hq in hits)
    (out_l / "index" / "image" / "shards.json").rename(out_l / "moved.json")  # no index: exact search
    assert_same_answers(SearchIndex.load(out_l).search(q, 10, filter={"shape": 2}), hits)


def test_workers_serve_parts_and_a_front_merges_them(tmp_path):
    x = blobs(1200)
    q = blobs(10, seed=6)
    out = fake_embedding(tmp_path, x)
    build_index(out, factory="HNSW16", sample_queries=20, shards=3)
    report = json.loads((out / "index" / "report.json").read_text())["modalities"]["image"]
    assert [p["search_params"] for p in report["part_reports"]] == ["efSearch=128"] * 3
    whole = SearchIndex.load(out).search(q, 8)
    workers = [SearchIndex.load(out, shards=[0]), SearchIndex.load(out, shards=[1, 2])]
    parts = [w.search(q, 8) for w in workers]
    assert all(h.row < 400 for hq in parts[0] for h in hq)
    assert all(h.row >= 400 for hq in parts[1] for h in hq)
    for i in range(len(q)):
        assert_same_answers([merge_hits([parts[0][i], parts[1][i]], 8)], [whole[i]])
    with pytest.raises(ConfigError, match=r"parts 0\.\.2"):
        SearchIndex.load(out, shards=[3]).search(q, 3)
