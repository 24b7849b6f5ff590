"""benchmarks/search_latency.py --disk: vectors generated chunk by chunk into float16 shards, reused by a
later run, and tuned from memory-mapped rows like the in-memory run of the same vectors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "search_latency.py"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))  # its `from machine import describe`
    spec = importlib.util.spec_from_file_location("search_latency", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "STEP", 400)  # tiny chunks and shards: several of each
    monkeypatch.setattr(module, "SHARD", 1200)
    return module


def generator(seed: int = 0, d: int = 16):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, d), dtype=np.float32) / np.sqrt(d)
    basis = np.linalg.qr(rng.standard_normal((d, 8)))[0].T.astype(np.float32)
    return centres, basis


def test_disk_shards_hold_the_generated_vectors_and_are_reused(bench, tmp_path, capsys):
    centres, basis = generator()
    rows = bench.on_disk(tmp_path, 3000, 16, "clustered", np.random.default_rng(3), centres, basis)
    x = bench.vectors(3000, 16, "clustered", np.random.default_rng(3), centres, basis)
    shards = sorted((tmp_path / "clustered-3000x16" / "embeddings" / "image").glob("shard_*.npy"))
    assert [len(np.load(s, mmap_mode="r")) for s in shards] == [1200, 1200, 600]
    assert rows.shape == (3000, 16) and np.allclose(rows[0:3000], x, atol=2e-3)  # float16 rounding
    again = bench.on_disk(tmp_path, 3000, 16, "clustered", np.random.default_rng(99), centres, basis)
    assert "reusing" in capsys.readouterr().err and np.array_equal(again[0:3000], rows[0:3000])
    (tmp_path / "random-3000x16").mkdir()
    (tmp_path / "random-3000x16" / "mine.txt").write_text("not the benchmark's")
    with pytest.raises(SystemExit, match="holds other files"):
        bench.on_disk(tmp_path, 3000, 16, "random", np.random.default_rng(3), centres, basis)
    # Exact ids by chunks equal a Flat index over all rows at once.
    q = bench.vectors(20, 16, "clustered", np.random.default_rng(4), centres, basis)
    flat = faiss.IndexFlatIP(16)
    flat.add(rows[0:3000])
    assert np.array_equal(bench.exact_ids(rows, q, 10), flat.search(q, 10)[1])


def test_a_disk_run_tunes_from_the_shards(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["search_latency.py"])
    argv = [
        "--sizes",
        "3000",
        "--dim",
        "16",
        "--data",
        "clustered",
        "--queries",
        "30",
        "--tune-queries",
        "100",
    ]
    argv += ["--candidates", "ivf-sq8", "--targets", "0.9", "--threads", "1"]
    disk = bench.main([*argv, "--disk", str(tmp_path)])
    memory = bench.main(argv)
    (a,), (b,) = disk["results"], memory["results"]
    assert (tmp_path / "clustered-3000x16" / "manifest.json").is_file()
    assert a["type"] == b["type"] == "ivf-sq8" and a["tuning_recall_bound"] >= 0.9
    assert abs(a["recall@10"] - b["recall@10"]) <= 0.05  # the same vectors, rounded to float16
    assert disk["environment"]["disk"] == str(tmp_path)
