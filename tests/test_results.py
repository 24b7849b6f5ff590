"""Result files in CLIP_benchmark's layout, comparison tables, suites and the CLI around them."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from coalign.evaluate.base import Metric
from coalign.evaluate.results import (
    LAYOUT_KEYS,
    DatasetInfo,
    Results,
    benchmark_records,
    comparison,
    load_scores,
    read_results,
    record_filename,
    to_csv,
    to_markdown,
    write_benchmark_files,
    write_results,
)
from helpers import suite_error

FIXTURES = Path(__file__).parent / "fixtures"

ZS, RET, LP = "zeroshot_classification", "zeroshot_retrieval", "linear_probe"
METRICS = [  # (evaluator, target, label, name, value, task, headline), as the evaluators declare them
    ("zero_shot", "image", "shape", "acc1", 0.9, ZS, True),
    ("zero_shot", "image", "shape", "acc5", 1.0, ZS, False),
    ("zero_shot", "image", "shape", "mean_per_class_recall", 0.88, ZS, False),
    ("zero_shot", "image", "color", "acc1", 0.8, ZS, True),
    ("zero_shot", "audio", "color", "acc1", 0.7, ZS, True),
    ("retrieval", "image", None, "image_retrieval_recall@5", 0.6, RET, True),
    ("retrieval", "image", None, "text_retrieval_recall@5", 0.7, RET, True),
    ("retrieval", "audio-image", None, "audio_retrieval_recall@1", 0.3, RET, True),
    ("linear_probe", "image", "shape", "lp_acc1", 0.95, LP, True),
]


def results(checkpoint: str = "") -> Results:
    metrics = [Metric(e, "world_test", t, label, n, v, task, h) for e, t, label, n, v, task, h in METRICS]
    info = DatasetInfo(100, {"empty_caption": 0})
    return Results(metrics, {"world_test": info}, model="demo", checkpoint=checkpoint, step=600, by="train")


def test_records_match_clip_benchmark_layout():
    fixture = json.loads((FIXTURES / "clip_benchmark_cifar10.json").read_text())
    records = benchmark_records(results("runs/demo/checkpoints/step_00000600"))
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
    assert {r["pretrained"] for r in records} == {"step_00000600"}


def test_single_label_dataset_is_named_like_clip_benchmark():
    one = Metric("zero_shot", "digits", "image", "digit", "acc1", 0.93, ZS, True)
    records = benchmark_records(Results([one], {"digits": DatasetInfo(10)}, model="m"))
    assert [r["dataset"] for r in records] == ["digits"]
    assert record_filename(records[0]) == "digits_m_en_zeroshot_classification.json"


def test_extra_options_are_stored_beside_metrics():
    probe = Metric("linear_probe", "d", "image", "y", "lp_acc1", 0.5, LP, True)
    evaluators = [{"name": "linear_probe", "options": {"shots": 4}, "benchmark": {"fewshot_k": 4}}]
    records = benchmark_records(Results([probe], {"d": DatasetInfo(10, {}, evaluators)}, model="m"))
    assert records[0]["metrics"] == {"lp_acc1": 0.5, "fewshot_k": 4}


def test_results_file_round_trip_and_flat_view(tmp_path):
    path = write_results(tmp_path / "results.json", results("ckpt/step_00000600"))
    back = read_results(path)
    assert back == results("ckpt/step_00000600")
    flat = back.flat()["world_test"]
    assert flat["samples"] == 100.0 and flat["skipped/empty_caption"] == 0.0
    assert flat["zero_shot/image/shape/acc1"] == 0.9
    assert flat["retrieval/audio-image/audio_retrieval_recall@1"] == 0.3
    assert not list(tmp_path.glob(".results.json.*"))  # the atomic write left no temporary file
    with pytest.raises(ValueError, match="not a coalign results file"):
        read_results(FIXTURES / "clip_benchmark_cifar10.json")


def test_round_trip_and_comparison_with_clip_benchmark_files(tmp_path):
    ours = write_benchmark_files(results(), tmp_path / "ours")
    assert all(p.suffix == ".json" for p in ours)
    scores = load_scores([tmp_path / "ours", FIXTURES / "clip_benchmark_cifar10.json"])
    assert len({(s.dataset, s.task) for s in scores}) == len(ours) + 1
    header, rows = comparison(scores)
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


def test_a_results_file_and_its_clip_benchmark_files_count_once(tmp_path):
    write_results(tmp_path / "suite" / "results.json", results())
    write_benchmark_files(results(), tmp_path / "suite" / "clip_benchmark")
    both = load_scores([tmp_path / "suite"])
    assert len(both) == len(METRICS)
    assert comparison(both) == comparison(load_scores([tmp_path / "suite" / "results.json"]))


def test_markdown_marks_the_best_model():
    header = ["dataset", "task", "metric", "a", "b"]
    md = to_markdown(header, [["d", "t", "acc1", 0.5, 0.75]])
    assert "| d | t | acc1 | 50.00 | **75.00** |" in md


def test_load_scores_rejects_other_json(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"dataset": "d"}))
    with pytest.raises(ValueError, match="not a CLIP_benchmark result file: no model, task, metrics"):
        load_scores([tmp_path / "x.json"])
    with pytest.raises(FileNotFoundError, match="no result files"):
        load_scores([tmp_path / "empty"]) if (tmp_path / "empty").mkdir() is None else None


def test_suite_errors_name_the_field(tmp_path):
    text = suite_error(
        tmp_path,
        "datasets:\n  d:\n    source: {source: world, split: test, sise: 10}\n"
        "tasks: [zero_shot, {name: zero_shot_fused, combine: sum}, retrival, zero_shot]\n",
    )
    assert "tasks.2: unknown evaluator 'retrival' (did you mean 'retrieval'?)" in text
    assert "tasks.1.combine" in text
    assert "tasks.3: evaluator 'zero_shot' is listed twice" in text
    assert "datasets.d.source" in text and "sise" in text
