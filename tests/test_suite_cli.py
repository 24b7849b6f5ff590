"""End to end: a tiny run evaluated by a suite through the CLI, result files, comparison, few-shot."""

from __future__ import annotations

import json
import shutil

import pytest

from coalign.cli import main
from coalign.config import recipes_dir
from coalign.evaluate.results import LAYOUT_KEYS
from coalign.evaluate.suites import load_suite

pytestmark = pytest.mark.slow

SUITE = """
name: tiny
datasets:
  world_test:
    source: {source: world, split: test, size: 40, captions: 2, partial_caption_prob: 0.0}
    train: {source: world, split: train, size: 80, partial_caption_prob: 0.0}
  world_heldout:
    source: {source: world, split: heldout, size: 24, captions: 2}
    tasks: [zero_shot]
tasks:
  - zero_shot
  - retrieval
  - {name: linear_probe, wd_coarse: 3}
  - {name: knn, k: 5}
  - {name: coop, steps: 10, shots: 4}
batch_size: 64
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_run):
    root = tmp_path_factory.mktemp("suite_cli")
    shutil.copytree(tiny_run, root / "run")  # the suite writes its results and cache into the run
    (root / "tiny.yaml").write_text(SUITE)
    return root


def test_every_shipped_suite_loads():
    for path in sorted((recipes_dir().parent / "suites").glob("*.yaml")):
        assert load_suite(path).datasets


def test_suite_writes_clip_benchmark_files_and_compare_builds_tables(run, capsys):
    out = run / "results"
    assert main(["eval", str(run / "run"), "--suite", str(run / "tiny.yaml"), "--out", str(out)]) == 0
    files = sorted((out / "clip_benchmark").glob("*.json"))
    records = [json.loads(f.read_text()) for f in files]
    assert all(list(r) == list(LAYOUT_KEYS) for r in records)
    kinds = {(r["dataset"], r["task"]) for r in records}
    assert ("world_test/shape", "zeroshot_classification") in kinds
    assert ("world_test", "zeroshot_retrieval") in kinds
    assert ("world_test/color", "linear_probe") in kinds
    assert ("world_test/size", "knn") in kinds
    assert ("world_test/position", "coop") in kinds
    assert ("world_heldout/shape", "zeroshot_classification") in kinds
    assert not any(d.startswith("world_heldout") and t != "zeroshot_classification" for d, t in kinds)
    lp = next(r for r in records if r["task"] == "linear_probe")
    assert {"lp_acc1", "lp_mean_per_class_recall"} <= set(lp["metrics"])
    assert all(0.0 <= v <= 1.0 for r in records for k, v in r["metrics"].items() if "acc" in k)
    # the second evaluation reads the cached embeddings
    cache = run / "run" / "eval" / "cache"
    before = {p: p.stat().st_mtime_ns for p in cache.glob("*.pt")}
    assert len(before) == 3  # world_test test + train, world_heldout test
    assert main(["eval", str(run / "run"), "--suite", str(run / "tiny.yaml"), "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.pt")} == before

    table = run / "table"
    assert main(["compare", str(out), "--out", str(table)]) == 0
    csv_text = (run / "table.csv").read_text().splitlines()
    assert csv_text[0].startswith("dataset,task,metric,demo (step_")
    md = (run / "table.md").read_text()
    assert "| world_test/shape | zeroshot_classification | acc1 |" in md
    assert main(["compare", str(out), "--out", str(table), "--metrics", "nothing-matches"]) == 2


def test_fewshot_table_has_every_method_and_k(run, capsys):
    out = run / "fewshot"
    code = main(["fewshot", str(run / "run"), "--suite", str(run / "tiny.yaml"), "--shots", "1", "2"])
    assert code == 0
    assert main(["fewshot", str(run / "run"), "--suite", str(run / "tiny.yaml"), "--shots", "0"]) == 2
    values = json.loads((run / "run" / "eval" / "fewshot.json").read_text())
    assert set(values) == {"world_test/shape", "world_test/color", "world_test/size", "world_test/position"}
    for methods in values.values():
        assert set(methods["zero-shot"]) == {"0"}
        assert set(methods["CoOp"]) == set(methods["linear probe"]) == {"1", "2"}
    md = (run / "run" / "eval" / "fewshot.md").read_text()
    assert md.splitlines()[0] == "| target | method | zero-shot | k=1 | k=2 |"
    assert out  # the default output folder is under the run
