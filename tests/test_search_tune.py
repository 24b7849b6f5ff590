"""Recall-targeted index tuning (coalign.search.tune): the chosen index reaches its target on queries
it never saw, its parameters are stored and used by SearchIndex, and an impossible target is refused."""

from __future__ import annotations

import json
import re

import faiss
import numpy as np
import pytest

from coalign.cli.search import build_parser
from coalign.registry import ConfigError
from coalign.search.index import build_index, exact_topk_scores
from coalign.search.query import SearchIndex
from coalign.search.tune import tune
from test_search import fake_embedding


def blobs(n: int, d: int = 32, seed: int = 0, spread: float = 0.7) -> np.ndarray:
    """Normalised points around 20 overlapping centres: an IVF needs several probes for recall 0.9."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, d))
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, 20, n)] + spread * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def fresh_recall(index: faiss.Index, x: np.ndarray, q: np.ndarray, k: int = 10) -> float:
    """recall@k of `index` (over x) for queries q not in x, by score against exact search."""
    _, ids = index.search(q, k)
    kth = exact_topk_scores(x, q, k)[:, -1]
    scores = np.einsum("qd,qkd->qk", q, x[ids])
    return float(((ids >= 0) & (scores >= kth[:, None] - 1e-5)).mean())


def test_tuner_reaches_its_target_on_new_queries():
    x = blobs(4000)
    index, report = tune(x, 0.9, queries=200, kinds=("flat", "ivf-flat", "ivf-sq8", "hnsw"))
    assert index.ntotal == len(x) and report["target_recall"] == 0.9
    rows = {r["name"]: r for r in report["candidates"]}
    assert set(rows) == {"flat", "ivf-flat", "ivf-sq8", "hnsw"}
    chosen = rows[report["type"]]
    assert chosen["status"] == "chosen" and chosen["recall"] >= 0.9
    assert chosen["p50_ms"] == min(r["p50_ms"] for r in rows.values() if "p50_ms" in r)
    assert rows["flat"]["recall"] == 1.0
    # The sweep stops at the cheapest setting: one step less misses the target (IVF needs > 1 probe here).
    nprobe = int(re.fullmatch(r"nprobe=(\d+)", rows["ivf-flat"]["params"]).group(1))
    assert nprobe > 1
    ivf = faiss.index_factory(32, rows["ivf-flat"]["factory"], faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    ivf.add(x)
    q = blobs(300, seed=1)  # queries from the same distribution, never seen by the tuner
    ivf.nprobe = nprobe
    assert fresh_recall(ivf, x, q) >= 0.85
    ivf.nprobe = nprobe // 2
    assert fresh_recall(ivf, x, q) < 0.9 + 0.03
    # The returned index carries the chosen parameters and keeps its promise on the new queries.
    assert fresh_recall(index, x, q) >= 0.85


def test_impossible_target_names_the_best_recall():
    x = blobs(1500)
    with pytest.raises(ConfigError) as err:
        tune(x, 0.999, queries=150, kinds=("ivf-pq",))
    message = str(err.value)
    best = float(re.search(r"best recall found is ([0-9.]+) \(ivf-pq, nprobe=\d+\)", message).group(1))
    assert 0 < best < 0.999 and "lower --recall" in message
    # A budget that admits only the lossy candidates: the refusal names the limit.
    # A budget that admits only a lossy candidate (flat needs 1500 * 32 * 4 bytes = 0.18 MB): the refusal
    # names the limit and the best recall of what fits.
    with pytest.raises(ConfigError, match=r"within --max-memory 0\.1 MB.*found is 0\.\d+ \(ivf-sq8, nprobe="):
        tune(x, 0.9999, max_memory_mb=0.1, queries=150, kinds=("flat", "ivf-sq8"))
    with pytest.raises(ConfigError, match="no index fits within --max-memory"):
        tune(x, 0.9, max_memory_mb=0.01, queries=150, kinds=("flat", "hnsw"))
    with pytest.raises(ConfigError, match=r"--recall must be a number in \(0, 1\]"):
        tune(x, 1.5)
    with pytest.raises(ConfigError, match="valid: flat, ivf-flat"):
        tune(x, 0.9, kinds=("ivf-magic",))


def test_over_memory_and_build_time_are_skipped():
    x = blobs(2000)
    _, report = tune(x, 0.8, max_memory_mb=0.2, queries=100, kinds=("flat", "ivf-sq8"))
    rows = {r["name"]: r for r in report["candidates"]}  # flat needs 2000 * 32 * 4 bytes = 0.24 MB
    assert rows["flat"]["status"] == "over memory" and rows["ivf-sq8"]["status"] == "chosen"
    with pytest.raises(ConfigError, match="no index fits within --max-build-seconds 1e-09") as err:
        tune(x, 0.8, max_build_seconds=1e-9, queries=100, kinds=("ivf-sq8", "hnsw"))
    assert "(tried ivf-sq8, hnsw)" in str(err.value)


def test_index_command_stores_and_uses_the_chosen_parameters(tmp_path, capsys):
    x = blobs(3000)
    out = fake_embedding(tmp_path, x)
    parser = build_parser()
    args = parser.parse_args(
        [
            "index",
            str(out),
            "--recall",
            "0.9",
            "--sample-queries",
            "200",
            "--candidates",
            "ivf-flat",
            "hnsw",
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "index" / "report.json").read_text())
    entry = report["modalities"]["image"]
    assert report["target_recall"] == 0.9 and entry["recall@10"] >= 0.9
    assert [r["name"] for r in entry["candidates"]] == ["ivf-flat", "hnsw"]
    assert "chosen" in printed and "ivf-flat" in printed and "hnsw" in printed
    searcher = SearchIndex.load(out)._searcher("image")
    name, value = entry["search_params"].split("=")
    inner = faiss.downcast_index(searcher)
    got = inner.nprobe if name == "nprobe" else inner.hnsw.efSearch
    assert got == int(value)
    hits = SearchIndex.load(out).search(x[[3]], 5)[0]
    assert hits[0].id == "v3"
    with pytest.raises(ConfigError, match="not both"):
        build_index(out, factory="Flat", target_recall=0.9)
    args = parser.parse_args(["index", str(out), "--candidates", "flat"])
    with pytest.raises(ConfigError, match="give --recall too"):
        args.func(args)
