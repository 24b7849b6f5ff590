"""Filtered search (labels) and combined text + image queries, on synthetic vectors (no model)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from coalign.registry import ConfigError
from coalign.search import METADATA
from coalign.search.filters import LabelIndex, parse_filter
from coalign.search.index import build_index
from coalign.search.query import SearchIndex
from test_search import fake_embedding
from test_search_tune import blobs


def labelled(tmp_path, n: int = 3000):
    """A fake embedding whose row i has labels shape = i % 3, color = i % 5 (and rows % 7 == 0 no color)."""
    x = blobs(n)
    out = fake_embedding(tmp_path, x)
    table = pq.read_table(out / METADATA)
    labels = [json.dumps({"shape": i % 3, **({} if i % 7 == 0 else {"color": i % 5})}) for i in range(n)]
    pq.write_table(table.set_column(4, "labels", [labels]), out / METADATA)
    shape, color = np.arange(n) % 3, np.where(np.arange(n) % 7 == 0, -1, np.arange(n) % 5)
    return out, x, shape, color


def stored(x: np.ndarray) -> np.ndarray:
    """x as the embedding holds it: float16, re-normalised."""
    x = x.astype(np.float16).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def same_as_brute_force(x, q, rows, k, mask) -> bool:
    """The returned rows score as the exact top-k among the rows where mask holds (near-ties in any
    order), scores computed on the stored vectors."""
    xs = stored(x)
    s = q @ xs.T
    s[:, ~mask] = -np.inf
    best = -np.sort(-s, axis=1)[:, :k]
    got = [np.sort([q[i] @ xs[r] for r in rq])[::-1] for i, rq in enumerate(rows)]
    return all(np.allclose(g, b[np.isfinite(b)], atol=1e-5) for g, b in zip(got, best, strict=True))


@pytest.mark.parametrize(
    ("factory", "prefilter"),
    [
        (None, True),
        ("Flat", True),
        ("Flat", False),
        ("IVF16,Flat", False),
        ("HNSW16", True),
        ("HNSW16", False),
    ],
)
def test_filters_return_only_matching_items(tmp_path, monkeypatch, factory, prefilter):
    out, x, shape, color = labelled(tmp_path)
    if factory:
        build_index(out, factory=factory, sample_queries=20)
    # PREFILTER_MAX 0: every filter goes to FAISS with an ID selector; large: scored over the rows.
    monkeypatch.setattr("coalign.search.query.PREFILTER_MAX", 10**9 if prefilter else 0)
    index = SearchIndex.load(out)
    if factory == "IVF16,Flat":  # all lists: the filtered IVF answer must then be exact
        index._searcher("image").nprobe = 16
    q = blobs(20, seed=3)
    for flt, mask in [
        ({"shape": 1}, shape == 1),
        ({"shape": 1, "color": [0, 2]}, (shape == 1) & np.isin(color, [0, 2])),
        ({"color": 4}, color == 4),
    ]:
        hits = index.search(q, 10, filter=flt)
        rows = [[h.row for h in hq] for hq in hits]
        assert all(mask[r] for rq in rows for r in rq)  # only matching items
        assert all(json.loads(json.dumps(h.labels))["shape"] == shape[h.row] for hq in hits for h in hq)
        if factory != "HNSW16":  # exact paths: the same as brute force over the matching rows
            assert same_as_brute_force(x, q, rows, 10, mask)
        else:
            assert np.mean([len(r) == 10 for r in rows]) == 1.0


def test_filter_edge_cases(tmp_path):
    out, x, shape, color = labelled(tmp_path, 200)
    index = SearchIndex.load(out)
    q = x[:2]
    assert index.search(q, 5, filter={"shape": 7}) == [[], []]  # no such value: nothing matches
    few = index.search(q, 100, filter={"shape": 0, "color": 3})  # fewer matches than k: all of them
    expected = {i for i in range(200) if shape[i] == 0 and color[i] == 3}
    assert {h.row for h in few[0]} == expected and len(few[0]) == len(expected)
    with pytest.raises(ConfigError, match="no label 'size'.*labels: color, shape"):
        index.search(q, 5, filter={"size": 1})
    for bad in [{}, [1], {"shape": []}, {"shape": 1.5}, {"shape": True}, {"shape": {"a": 1}}]:
        with pytest.raises(ConfigError, match="filter"):
            parse_filter(bad)
    labels = LabelIndex([None, '{"a": "x"}', '{"a": "y", "b": 1}', '{"b": 1}'])
    assert labels.rows({"a": "x"}).tolist() == [1] and labels.rows({"b": 1}).tolist() == [2, 3]
    assert labels.rows({"a": ["x", "y"], "b": 1}).tolist() == [2]


def test_combined_text_and_image_queries(tmp_path):
    x = blobs(500)
    out = fake_embedding(tmp_path, x)
    index = SearchIndex.load(out)
    t, i = blobs(1, seed=11)[0], blobs(1, seed=12)[0]
    index.encode_text = lambda texts: t[None]  # the towers' output, without a model
    index.encode_image = lambda images: i[None]
    np.testing.assert_allclose(index.encode_query("a", None)[0], t, rtol=1e-6)
    np.testing.assert_allclose(index.encode_query("a", "img", weights=(1, 0))[0], t, rtol=1e-6)
    mix = 0.7 * t + 0.3 * i
    np.testing.assert_allclose(
        index.encode_query("a", "img", (0.7, 0.3))[0], mix / np.linalg.norm(mix), rtol=1e-5
    )
    # product: ranking by <t * i, x> is ranking by Symile's multilinear score sum(t * i * x).
    q = index.encode_query("a", "img", combine="product")
    hits = index.search(q, 5)[0]
    assert [h.row for h in hits] == list(np.argsort(-(stored(x) @ (t * i)))[:5])
    with pytest.raises(ConfigError, match="needs a text, an image"):
        index.encode_query()
    with pytest.raises(ConfigError, match="weights"):
        index.encode_query("a", "img", (-1, 0.5))
    with pytest.raises(ConfigError, match="combine"):
        index.encode_query("a", "img", combine="max")


def test_serve_search_takes_a_filter(tmp_path):
    from fastapi.testclient import TestClient

    from coalign.serve.app import create_app

    out, x, shape, color = labelled(tmp_path, 300)
    client = TestClient(create_app(SearchIndex.load(out)))
    body = {"vector": x[5].tolist(), "k": 8, "filter": {"shape": 2, "color": [1, 3]}}
    r = client.post("/search", json=body)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 8
    assert all(h["labels"]["shape"] == 2 and h["labels"]["color"] in (1, 3) for h in results)
    unfiltered = client.post("/search", json={"vector": x[5].tolist(), "k": 1}).json()["results"]
    assert unfiltered[0]["id"] == "v5"  # row 5 has shape 2, color 0: filtered out above
    # a label no item has is a filter nothing matches (the CLI names it as an error)
    unknown = client.post("/search", json={**body, "filter": {"size": 1}})
    assert unknown.status_code == 200 and unknown.json()["results"] == []
    for bad in [{}, {"shape": 1.5}, {"shape": []}, {"shape": [True]}]:
        assert client.post("/search", json={**body, "filter": bad}).status_code == 422, bad
