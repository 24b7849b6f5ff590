"""Embedding a source (shards, metadata, thumbnails, resume, skips), FAISS index choice and recall,
and SearchIndex queries, on a tiny trained run and on synthetic vectors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from coalign.cli.search import build_parser
from coalign.config import load_recipe
from coalign.data.sources.base import SampleError
from coalign.registry import ConfigError
from coalign.search import (
    METADATA,
    metadata_schema,
    read_manifest,
    shard_path,
    thumbnail_file,
    write_manifest,
)
from coalign.search.embed import embed_source, resolve_source_spec
from coalign.search.index import IndexRule, build_index, choose_index
from coalign.search.query import Hit, SearchIndex, exact_search

# Tests that use the trained run share one module fixture (training it takes ~10 s on 2 cores): slow.
slow = pytest.mark.slow
WORLD = {"source": "world", "split": "test", "size": 24}
SHARD, BATCH = 10, 5  # 24 samples -> shards of 10, 10 and 4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from coalign.train.loop import train  # the test trains a run; the library never imports the loop

    torch.set_num_threads(2)
    overrides = [
        "data.train.size=96",
        "data.eval.heldout_samples.size=24",
        "data.eval.heldout_combos.size=24",
        "train.steps=2",
    ]
    out = tmp_path_factory.mktemp("run") / "run"
    train(load_recipe("demo", overrides, smoke=True), out, progress=False)
    return out


@pytest.fixture(scope="module")
def embedded(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emb") / "world"
    summary = embed_source(run_dir, WORLD, out, batch_size=BATCH, shard_size=SHARD, progress=False)
    assert summary["rows"] == 24 and summary["computed_shards"] == 3 and summary["finished"]
    return out


@pytest.fixture
def indexed(embedded, tmp_path) -> Path:
    """A private copy of the embedded folder (tests that add index/ must not change the shared one)."""
    out = tmp_path / "copy"
    shutil.copytree(embedded, out)
    return out


def files_of(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------- embed


@slow
def test_embed_layout(embedded, run_dir):
    manifest = read_manifest(embedded)
    assert manifest["finished"] and manifest["count"] == 24 and manifest["modalities"] == ["image", "text"]
    assert [s["rows"] for s in manifest["shards"]] == [10, 10, 4] and manifest["skipped"] == {}
    dim = manifest["embed_dim"]
    for m in ("image", "text"):
        parts = [np.load(shard_path(embedded, m, s)) for s in range(3)]
        assert [p.shape for p in parts] == [(10, dim), (10, dim), (4, dim)]
        assert all(p.dtype == np.float16 for p in parts)
        np.testing.assert_allclose(
            np.linalg.norm(np.concatenate(parts).astype(np.float32), axis=1), 1, atol=2e-3
        )
    table = pq.read_table(embedded / METADATA)
    assert table.column_names == ["row", "id", "path", "caption", "labels", "source_index"]
    meta = table.to_pylist()
    assert [r["row"] for r in meta] == list(range(24)) == [r["source_index"] for r in meta]
    assert meta[7]["id"] == "world-test-7" and meta[7]["path"] is None and meta[7]["caption"]
    assert set(json.loads(meta[7]["labels"])) == {"shape", "color", "size", "position"}
    thumbs = sorted((embedded / "thumbnails").iterdir())
    assert len(thumbs) == 24
    with Image.open(thumbnail_file(embedded, 23)) as im:
        assert im.size == (64, 64) and im.format == "PNG"


@slow
def test_resume_recomputes_only_unfinished_shards(embedded, run_dir, tmp_path):
    out = tmp_path / "cut"
    cut = embed_source(run_dir, WORLD, out, batch_size=BATCH, shard_size=SHARD, progress=False, stop_after=1)
    assert not cut["finished"] and cut["computed_shards"] == 1 and not (out / METADATA).exists()
    with pytest.raises(FileNotFoundError, match="unfinished"):
        SearchIndex.load(out)
    with pytest.raises(FileNotFoundError, match="resume"):
        build_index(out)
    first = {k: v for k, v in files_of(out).items() if "00000" in k}
    assert len(first) == 3  # image shard, text shard, metadata part

    done = embed_source(run_dir, WORLD, out, batch_size=BATCH, shard_size=SHARD, progress=False)
    assert done["finished"] and (done["computed_shards"], done["reused_shards"]) == (2, 1)
    assert {k: v for k, v in files_of(out).items() if k in first} == first  # shard 0 not rewritten
    # The result equals the uninterrupted run.
    for m in ("image", "text"):
        for s in range(3):
            np.testing.assert_array_equal(np.load(shard_path(out, m, s)), np.load(shard_path(embedded, m, s)))
    assert pq.read_table(out / METADATA).equals(pq.read_table(embedded / METADATA))
    assert read_manifest(out)["shards"] == read_manifest(embedded)["shards"]

    # A shard whose file is gone (and a manifest entry dropped) is recomputed; nothing else is.
    shard_path(out, "image", 2).unlink()
    manifest = read_manifest(out)
    manifest["shards"] = manifest["shards"][:1] + manifest["shards"][2:]  # shard 1's entry lost
    write_manifest(out, manifest)
    again = embed_source(run_dir, WORLD, out, batch_size=BATCH, shard_size=SHARD, progress=False)
    assert (again["computed_shards"], again["reused_shards"]) == (2, 1)
    np.testing.assert_array_equal(
        np.load(shard_path(out, "image", 2)), np.load(shard_path(embedded, "image", 2))
    )
    finished = embed_source(run_dir, WORLD, out, batch_size=BATCH, shard_size=SHARD, progress=False)
    assert finished["computed_shards"] == 0 and finished["rows"] == 24


@slow
def test_refuses_to_mix_embeddings(embedded, run_dir, tmp_path):
    with pytest.raises(FileExistsError, match="shard_size"):
        embed_source(run_dir, WORLD, embedded, shard_size=SHARD + 1, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a `coalign embed` folder"):
        embed_source(run_dir, WORLD, tmp_path / "other", progress=False)


def write_png(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 24, 3), color, dtype=np.uint8)).save(path)


@slow
def test_skips_and_counts_bad_samples_of_a_csv(run_dir, tmp_path):
    write_png(tmp_path / "imgs" / "red.png", (220, 30, 30))
    write_png(tmp_path / "imgs" / "blue.png", (30, 70, 230))
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not a png \x00\x01" * 8)
    rows = [
        ["imgs/red.png", "a red square"],
        ["imgs/bad.png", "a broken picture"],
        ["imgs/gone.png", "a missing picture"],
        ["imgs/red.png", ""],
        ["imgs/blue.png", "a blue square"],
    ]
    with open(tmp_path / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([["img", "cap"], *rows])
    out = tmp_path / "out"
    summary = embed_source(
        run_dir,
        str(tmp_path / "m.csv"),
        out,
        shard_size=2,
        progress=False,
        image_key="img",
        caption_key="cap",
    )
    assert summary["rows"] == 2
    assert summary["skipped"] == {"corrupt_image": 1, "missing_image": 1, "empty_caption": 1}
    assert read_manifest(out)["skipped"] == summary["skipped"]
    meta = pq.read_table(out / METADATA).to_pylist()
    assert [m["caption"] for m in meta] == ["a red square", "a blue square"]
    assert [m["source_index"] for m in meta] == [0, 4] and [m["row"] for m in meta] == [0, 1]
    assert meta[1]["path"] == str((tmp_path / "imgs" / "blue.png").absolute())
    with Image.open(thumbnail_file(out, 1)) as im:  # small images are kept as they are
        assert im.size == (24, 20)


@slow
def test_source_argument_forms(run_dir, tmp_path):
    from coalign.build import load_run

    recipe = load_run(run_dir).recipe
    assert resolve_source_spec("heldout_samples", recipe)["split"] == "test"
    assert resolve_source_spec("{source: world, split: heldout, size: 5}", recipe)["size"] == 5
    (tmp_path / "a.jsonl").write_text("")
    spec = resolve_source_spec(str(tmp_path / "a.jsonl"), recipe, caption_key="captions")
    assert spec == {"source": "jsonl", "path": str(tmp_path / "a.jsonl"), "caption_key": "captions"}
    with pytest.raises(ConfigError, match="heldout_samples, heldout_combos"):
        resolve_source_spec("heldout", recipe)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_source_spec(str(tmp_path / "nope.csv"), recipe)
    with pytest.raises(ConfigError, match="csv and jsonl"):
        resolve_source_spec("heldout_samples", recipe, image_key="img")


# ------------------------------------------------------------------------------------------- index


def fake_embedding(out: Path, x: np.ndarray, sizes: tuple[int, ...] | None = None) -> Path:
    """An OUT folder as `coalign embed` leaves it, holding the given image vectors (no model needed),
    in one float16 shard or split over shards of the given `sizes`."""
    n, d = x.shape
    sizes = (n,) if sizes is None else sizes
    assert sum(sizes) == n
    shard_path(out, "image", 0).parent.mkdir(parents=True)
    edges = np.cumsum((0, *sizes))
    for i in range(len(sizes)):
        np.save(shard_path(out, "image", i), x[edges[i] : edges[i + 1]].astype(np.float16))
    meta = {
        "row": list(range(n)),
        "id": [f"v{i}" for i in range(n)],
        "path": [None] * n,
        "caption": [None] * n,
        "labels": ["{}"] * n,
        "source_index": list(range(n)),
    }
    pq.write_table(pa.table(meta, schema=metadata_schema()), out / METADATA)
    shards = [{"shard": i, "rows": int(s)} for i, s in enumerate(sizes)]
    manifest = {"modalities": ["image"], "embed_dim": d, "finished": True, "shards": shards}
    write_manifest(out, {**manifest, "num_shards": len(sizes), "source": {}, "checkpoint": "none"})
    return out


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Easy data: normalised points around 50 centres."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((50, d))[rng.integers(0, 50, n)] + 0.3 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_index_rule():
    assert choose_index(10_000, 128).factory == "Flat"
    assert choose_index(500_000, 128).factory == "HNSW32"
    big = choose_index(5_000_000, 512)
    assert big.kind == "ivfpq" and big.factory == f"IVF{int(4 * 5_000_000**0.5)},PQ64np"
    assert choose_index(10_000, 128, max_memory_mb=1).kind == "ivfpq"  # flat needs 4.9 MB
    tight = choose_index(5_000_000, 512, max_memory_mb=300)
    assert tight.factory.endswith("PQ32np") and tight.memory_bytes <= 300 * 2**20  # shorter codes to fit
    rule = IndexRule(flat_max_n=100, hnsw_max_n=1000)
    assert [choose_index(n, 32, rule=rule).kind for n in (100, 1000, 5000)] == ["flat", "hnsw", "ivfpq"]


@pytest.mark.parametrize(
    ("rule", "factory", "kind", "min_recall"),
    [
        (None, None, "flat", 1.0),
        (IndexRule(flat_max_n=100), None, "hnsw", 0.95),
        (IndexRule(flat_max_n=100, hnsw_max_n=100), None, "ivfpq", 0.0),
        (None, "IVF16,Flat", "factory", 0.5),
    ],
)
def test_build_index_kinds_and_recall(tmp_path, rule, factory, kind, min_recall):
    x = clustered(3000, 32)
    out = fake_embedding(tmp_path, x)
    report = build_index(out, factory=factory, sample_queries=200, rule=rule)
    r = report["modalities"]["image"]
    assert r["type"] == kind and r["n"] == 3000 and r["recall_queries"] == 200
    assert min_recall <= r["recall@10"] <= 1.0
    assert (out / "index" / "image.faiss").is_file()
    assert json.loads((out / "index" / "report.json").read_text()) == report
    # SearchIndex uses the index; a stored vector finds itself.
    hits = SearchIndex.load(out).search(x[[5, 77]], 3)
    assert len(hits) == 2 and all(len(h) == 3 for h in hits)
    if kind in ("flat", "hnsw"):
        assert [h[0].id for h in hits] == ["v5", "v77"]


def test_index_needs_embeddings(tmp_path):
    with pytest.raises(FileNotFoundError, match="coalign embed"):
        build_index(tmp_path)
    with pytest.raises(ConfigError, match="index_factory"):
        build_index(fake_embedding(tmp_path, clustered(50, 8)), factory="NoSuchIndex")


def test_stale_index_is_refused(tmp_path):
    x = clustered(60, 8)
    out = fake_embedding(tmp_path, x)
    build_index(out)
    table = pq.read_table(out / METADATA).slice(0, 50)  # the embedding changed after indexing
    pq.write_table(table, out / METADATA)
    with pytest.raises(ConfigError, match="stale"):
        SearchIndex.load(out).search(x[:1], 3)


def test_exact_search_orders_ties_by_row():
    x = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8]], dtype=np.float32)
    scores, rows = exact_search(x, np.array([[1, 0]], dtype=np.float32), 3, chunk=2)
    assert rows.tolist() == [[0, 2, 3]] and np.allclose(scores, [[1, 1, 0.6]])


# ------------------------------------------------------------------------------------------ search


@slow
def test_search_exact_equals_flat_index(indexed):
    index = SearchIndex.load(indexed)
    assert len(index) == 24 and index.modalities == ["image", "text"]
    stored = np.load(shard_path(indexed, "image", 1)).astype(np.float32)
    exact = index.search(stored, 5)  # no index/ yet: exact search on the shards
    build_index(indexed)
    flat = SearchIndex.load(indexed).search(stored, 5)
    # Equal up to the order of near-ties: the same scores rank by rank, the same items above the last one.
    np.testing.assert_allclose(
        [[h.score for h in q] for q in exact], [[h.score for h in q] for q in flat], atol=1e-5
    )
    for e, f in zip(exact, flat, strict=True):
        assert {h.id for h in e if h.score > e[-1].score + 1e-5} <= {h.id for h in f}
    for i, hits in enumerate(flat):  # each stored vector finds its own item first
        assert hits[0].row == SHARD + i and hits[0].score == pytest.approx(1, abs=1e-3)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


@slow
def test_queries_encode_like_the_embedding(indexed):
    index = SearchIndex.load(indexed)
    item = index.item("world-test-15")
    assert isinstance(item, Hit) and item.row == 15 and item.score == 0 and item.labels
    assert index.item("nope") is None
    # The thumbnail is the lossless original image, and text = the first caption: same vectors.
    img = index.encode_image([index.thumbnail_path(item.id)])
    txt = index.encode_text([item.caption])
    assert img.shape == txt.shape == (1, index.embed_dim) and img.dtype == np.float32
    np.testing.assert_allclose(img[0], np.load(shard_path(indexed, "image", 1))[5], atol=3e-3)
    np.testing.assert_allclose(txt[0], np.load(shard_path(indexed, "text", 1))[5], atol=3e-3)
    assert index.search(img, 1)[0][0].id == item.id
    top = index.search(txt, 3, modality="text")[0]
    assert top[0].score > 0.999 and item.caption in [h.caption for h in top if h.score > 0.999]
    assert len(index.search(txt, 100)[0]) == 24  # k beyond the size returns everything
    with pytest.raises(SampleError):
        index.encode_image([b"not an image"])
    with pytest.raises(SampleError):
        index.encode_text(["  "])
    with pytest.raises(ConfigError, match="searchable modalities: image, text"):
        index.search(txt, 3, modality="audio")
    with pytest.raises(ValueError, match="shape"):
        index.search(np.zeros((1, 3)), 3)


@slow
def test_thumbnail_path_stays_inside(indexed, tmp_path):
    index = SearchIndex.load(indexed)
    path = index.thumbnail_path("world-test-3")
    assert path == (indexed / "thumbnails" / "3.png").resolve() and path.is_file()
    for bad in ["nope", "3", "../manifest.json", "/etc/passwd", "thumbnails/3.png", "../../x", "", None, 3]:
        assert index.thumbnail_path(bad) is None, bad
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    (indexed / "thumbnails" / "4.png").unlink()
    (indexed / "thumbnails" / "4.png").symlink_to(outside)
    assert index.thumbnail_path("world-test-4") is None


@slow
def test_commands(indexed, run_dir, tmp_path, capsys):
    parser = build_parser()
    out = tmp_path / "cli"
    src = "{source: world, split: test, size: 12}"
    args = parser.parse_args(["embed", str(run_dir), src, str(out), "--shard-size", "5", "--no-progress"])
    assert args.func(args) == 0
    assert "embedded 12 items (image, text)" in capsys.readouterr().out
    args = parser.parse_args(["index", str(out), "--factory", "HNSW8"])
    assert args.func(args) == 0
    assert "HNSW8" in capsys.readouterr().out
    thumb = str(thumbnail_file(out, 2))
    args = parser.parse_args(["search", str(out), "--image", thumb, "--k", "3"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "id", "score", "caption", "/", "path"]
    assert lines[1].split()[:2] == ["1", "world-test-2"] and len(lines) == 4
    args = parser.parse_args(["search", str(out), "--text", "a red circle", "--json", "--modality", "text"])
    assert args.func(args) == 0
    assert len([json.loads(line) for line in capsys.readouterr().out.splitlines()]) == 10
    args = parser.parse_args(["search", str(out), "--image", str(tmp_path / "missing.png")])
    with pytest.raises(ConfigError, match="--image"):
        args.func(args)
    args = parser.parse_args(["search", str(out)])
    with pytest.raises(ConfigError, match="give a query"):  # a query is required
        args.func(args)
