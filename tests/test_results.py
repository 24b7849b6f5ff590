"""Result files in CLIP_benchmark's layout, comparison tables, suites and the CLI around them."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from coalign.evaluate.results import (
    LAYOUT_KEYS,
    comparison,
    load_records,
    record_filename,
    to_csv,
    to_markdown,
    to_records,
    write_records,
)
from coalign.registry import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"

RESULTS = {
    "world_test": {
        "samples": 100.0,
        "skipped/empty_caption": 0.0,
        "zero_shot/image/shape/acc1": 0.9,
        "zero_shot/image/shape/acc5": 1.0,
        "zero_shot/image/shape/mean_per_class_recall": 0.88,
        "zero_shot/image/color/acc1": 0.8,
        "zero_shot/audio/color/acc1": 0.7,
        "retrieval/image/image_retrieval_recall@5": 0.6,
        "retrieval/image/text_retrieval_recall@5": 0.7,
        "retrieval/audio-image/audio_retrieval_recall@1": 0.3,
        "linear_probe/image/shape/lp_acc1": 0.95,
    }
}


def test_records_match_clip_benchmark_layout():
    fixture = json.loads((FIXTURES / "clip_benchmark_cifar10.json").read_text())
    records = to_records(RESULTS, "demo", "runs/demo/checkpoints/step_00000600")
    for record in records:
        assert list(record) == list(fixture) == list(LAYOUT_KEYS)  # same keys, same order
        for key in LAYOUT_KEYS:
            assert type(record[key]) is type(fixture[key])
    by = {(r["dataset"], r["task"]): r["metrics"] for r in records}
    assert by[("world_test/shape", "zeroshot_classification")] == {
        "acc1": 0.9,
        "acc5": 1.0,
        "mean_per_class_recall": 0.88,
    }
    assert by[("world_test/audio/color", "zeroshot_classification")] == {"acc1": 0.7}
    assert by[("world_test", "zeroshot_retrieval")] == {
        "image_retrieval_recall@5": 0.6,
        "text_retrieval_recall@5": 0.7,
    }
    assert by[("world_test/audio-image", "zeroshot_retrieval")] == {"audio_retrieval_recall@1": 0.3}
    assert by[("world_test/shape", "linear_probe")] == {"lp_acc1": 0.95}
    assert not any("samples" in r["metrics"] or "skipped" in r["dataset"] for r in records)


def test_single_label_dataset_is_named_like_clip_benchmark():
    records = to_records({"digits": {"zero_shot/image/digit/acc1": 0.93}}, "m")
    assert [r["dataset"] for r in records] == ["digits"]
    assert record_filename(records[0]) == "digits_m_en_zeroshot_classification.json"


def test_extra_options_are_stored_beside_metrics():
    records = to_records(
        {"d": {"linear_probe/image/y/lp_acc1": 0.5}}, "m", extra={"linear_probe": {"fewshot_k": 4}}
    )
    assert records[0]["metrics"] == {"lp_acc1": 0.5, "fewshot_k": 4}


def test_round_trip_and_comparison_with_clip_benchmark_files(tmp_path):
    ours = write_records(to_records(RESULTS, "demo"), tmp_path / "ours")
    assert all(p.suffix == ".json" for p in ours)
    records = load_records([tmp_path / "ours", FIXTURES / "clip_benchmark_cifar10.json"])
    assert len(records) == len(ours) + 1
    header, rows = comparison(records)
    assert header[:3] == ["dataset", "task", "metric"]
    assert header[3:] == ["demo", "ViT-B-32-quickgelu (laion400m_e32)"]
    table = {tuple(r[:3]): r[3:] for r in rows}
    assert table[("cifar10", "zeroshot_classification", "acc1")] == [None, 0.9074]
    assert table[("world_test/shape", "zeroshot_classification", "acc1")] == [0.9, None]
    assert ("world_test/shape", "zeroshot_classification", "acc5") not in table  # headline metrics only
    parsed = list(csv.reader(io.StringIO(to_csv(header, rows))))
    assert parsed[0] == header and len(parsed) == len(rows) + 1
    md = to_markdown(header, rows)
    assert "| cifar10 | zeroshot_classification | acc1 | – | 90.74 |" in md


def test_markdown_marks_the_best_model():
    header = ["dataset", "task", "metric", "a", "b"]
    md = to_markdown(header, [["d", "t", "acc1", 0.5, 0.75]])
    assert "| d | t | acc1 | 50.00 | **75.00** |" in md


def test_load_records_rejects_other_json(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"dataset": "d"}))
    with pytest.raises(ValueError, match="not a CLIP_benchmark result file: no model, task, metrics"):
        load_records([tmp_path / "x.json"])
    with pytest.raises(FileNotFoundError, match="no result files"):
        load_records([tmp_path / "empty"]) if (tmp_path / "empty").mkdir() is None else None


def test_suite_errors_name_the_field(tmp_path):
    from coalign.evaluate.runner import load_suite

    bad = tmp_path / "s.yaml"
    bad.write_text(
        "datasets:\n  d:\n    source: {source: world, split: test, sise: 10}\n"
        "tasks: [zero_shot, {name: zero_shot_fused, combine: sum}, retrival, zero_shot]\n"
    )
    with pytest.raises(ConfigError) as err:
        load_suite(bad)
    text = str(err.value)
    assert "tasks.2: unknown evaluator 'retrival' (did you mean 'retrieval'?)" in text
    assert "tasks.1.combine" in text
    assert "tasks.3: evaluator 'zero_shot' is listed twice" in text
    assert "datasets.d.source" in text and "sise" in text
