"""`coalign embed --nproc 2` (issue #14): two real processes each embed a share of the shards, and
the output folder equals a single-process embed's file for file: the same rows, in the same order,
with the same row ids, although skipped samples make every shard's row count different (so a
rank cannot number its rows before it hears how many the shards before it kept); here finishing
a folder that one process left half done.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from coalign.search import METADATA, part_path, read_manifest, shard_path
from coalign.search.embed import embed_source
from parts import one_thread

pytestmark = pytest.mark.slow

SHARD = 3


def _manifest(root: Path) -> Path:
    """16 rows of which 5 are skipped (a missing image, an empty caption), unevenly per shard."""
    imgs = root / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    lines = ["filepath,title"]
    bad = {1: "missing", 4: "missing", 5: "empty", 6: "missing", 13: "empty"}
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
        image = "imgs/gone.png" if bad.get(i) == "missing" else f"imgs/{i}.png"
        caption = "" if bad.get(i) == "empty" else f"a picture number {i}"
        lines.append(f"{root / image},{caption}")
    path = root / "pictures.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _embed_two(run: Path, source: Path, out: Path) -> str:
    cmd = [sys.executable, "-m", "coalign", "embed", str(run), str(source), str(out)]
    cmd += ["--shard-size", str(SHARD), "--batch-size", "2", "--no-progress", "--nproc", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default, made explicit
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _assert_same_output(got: Path, expected: Path) -> None:
    a, b = read_manifest(got), read_manifest(expected)
    assert a == b
    for entry in b["shards"]:
        for m in b["modalities"]:
            np.testing.assert_array_equal(
                np.load(shard_path(got, m, entry["shard"])), np.load(shard_path(expected, m, entry["shard"]))
            )
        assert pq.read_table(part_path(got, entry["shard"])).equals(
            pq.read_table(part_path(expected, entry["shard"]))
        )
    assert pq.read_table(got / METADATA).equals(pq.read_table(expected / METADATA))
    thumbs = sorted(p.name for p in (expected / "thumbnails").iterdir())
    assert sorted(p.name for p in (got / "thumbnails").iterdir()) == thumbs
    for name in thumbs:
        assert (got / "thumbnails" / name).read_bytes() == (expected / "thumbnails" / name).read_bytes()


def test_two_processes_embed_exactly_what_one_does(tiny_run, tmp_path):
    source = _manifest(tmp_path)
    one = tmp_path / "one"
    with one_thread():
        summary = embed_source(tiny_run, str(source), one, batch_size=2, shard_size=SHARD, progress=False)
    assert summary["rows"] == 11 and summary["shards"] == 6
    rows = [s["rows"] for s in read_manifest(one)["shards"]]
    assert len(set(rows)) > 1, rows  # the shards keep different numbers of rows

    # One process embeds 2 of the 6 shards and stops; two processes finish the folder, in two rounds
    # (one launch, to keep the test short: the numbering after reused shards is the harder case).
    half = tmp_path / "half"
    with one_thread():
        embed_source(
            tiny_run, str(source), half, batch_size=2, shard_size=SHARD, progress=False, stop_after=2
        )
    out = _embed_two(tiny_run, source, half)
    assert "embedded 11 items" in out and "4 computed, 2 reused" in out
    _assert_same_output(half, one)
