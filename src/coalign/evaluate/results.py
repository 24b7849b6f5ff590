"""Result files in CLIP_benchmark's layout, and comparison tables built from many of them.

A CLIP_benchmark result file is one JSON object per (dataset, model, task):

    {"dataset": "cifar10", "model": "ViT-B-32", "pretrained": "laion400m_e32",
     "task": "zeroshot_classification", "metrics": {"acc1": 0.9074, "acc5": 0.998}, "language": "en"}

coalign's evaluators return flat keys `<evaluator>/<modality>/<label>/<metric>` (classification) or
`<evaluator>/<modality>/<metric>` (retrieval). `to_records` regroups them into that layout: the task is
CLIP_benchmark's name for the evaluator; the dataset is the coalign dataset name, followed by the
modality when it is not the image (CLIP_benchmark only knows images) and by the label key when the
dataset has several (the world classifies shape, color, size and position), e.g. `world_test/shape`,
`world_test/audio/shape`, `world_test/audio-image`. Metric names are CLIP_benchmark's (`acc1`, `acc5`,
`mean_per_class_recall`, `image_retrieval_recall@k`, `text_retrieval_recall@k`, `lp_acc1`, ...).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from coalign.io import atomic_write_text

LAYOUT_KEYS = ("dataset", "model", "pretrained", "task", "metrics", "language")

# coalign evaluator -> CLIP_benchmark task name (evaluators CLIP_benchmark lacks keep their own name)
TASK_NAMES = {
    "zero_shot": "zeroshot_classification",
    "zero_shot_fused": "zeroshot_classification",
    "retrieval": "zeroshot_retrieval",
    "retrieval_late": "zeroshot_retrieval",
    "linear_probe": "linear_probe",
}
# Metrics shown by default in comparison tables: the headline number of each task.
HEADLINE = re.compile(r"^(acc1|lp_acc1|knn_acc1|.*retrieval_recall@(1|5)|recall@(1|5))$")


def to_records(
    results: dict[str, dict[str, float]],
    model: str,
    pretrained: str = "",
    extra: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Regroup `evaluate()`'s {dataset: {key: value}} into CLIP_benchmark records.

    `extra[evaluator]` is merged into the metrics of that evaluator's records (CLIP_benchmark stores
    `fewshot_k`, `lr`, ... beside `lp_acc1`). Keys that are not evaluator metrics (`samples`,
    `skipped/...`) are not results and are left out."""
    grouped: dict[tuple[str, str, str], dict[str, Any]] = {}
    for dataset, metrics in results.items():
        labels = {k.split("/")[2] for k in metrics if k.count("/") == 3}
        for key, value in metrics.items():
            parts = key.split("/")
            if len(parts) not in (3, 4) or parts[0] == "skipped":
                continue
            evaluator, modality, metric = parts[0], parts[1], parts[-1]
            name = dataset if modality == "image" else f"{dataset}/{modality}"
            if len(parts) == 4 and (len(labels) > 1 or evaluator == "zero_shot_fused"):
                name = f"{name}/{parts[2]}"
            task = TASK_NAMES.get(evaluator, evaluator)
            record = grouped.setdefault((name, task, evaluator), {})
            record[metric] = value
    records = []
    for (name, task, evaluator), metrics in grouped.items():
        metrics.update((extra or {}).get(evaluator, {}))
        records.append(
            {
                "dataset": name,
                "model": model,
                "pretrained": pretrained,
                "task": task,
                "metrics": metrics,
                "language": "en",
            }
        )
    return records


def record_filename(record: dict[str, Any]) -> str:
    """CLIP_benchmark's `{dataset}_{pretrained}_{model}_{language}_{task}.json` naming, made safe."""
    parts = [record["dataset"], record["pretrained"], record["model"], record["language"], record["task"]]
    return re.sub(r"[^A-Za-z0-9._@+-]+", "_", "_".join(p for p in parts if p)) + ".json"


def write_records(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for record in records:
        path = out_dir / record_filename(record)
        atomic_write_text(path, json.dumps(record, indent=2))
        paths.append(path)
    return paths


def load_records(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Result files (folders are searched for *.json); a file that is not a result says which key it lacks."""
    records = []
    for path in paths:
        files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise FileNotFoundError(f"no result files (*.json) under '{path}'")
        for f in files:
            record = json.loads(f.read_text())
            missing = [k for k in ("dataset", "model", "task", "metrics") if k not in record]
            if missing:
                raise ValueError(f"'{f}' is not a CLIP_benchmark result file: no {', '.join(missing)}")
            records.append(record)
    return records


def model_label(record: dict[str, Any]) -> str:
    return f"{record['model']} ({record['pretrained']})" if record.get("pretrained") else record["model"]


def comparison(
    records: list[dict[str, Any]], metrics: str | None = None
) -> tuple[list[str], list[list[Any]]]:
    """A pivot: one row per (dataset, task, metric), one column per model. `metrics` is a regular
    expression over metric names (default: each task's headline metric). Returns (header, rows)."""
    pattern = re.compile(metrics) if metrics else HEADLINE
    models: list[str] = []
    cells: dict[tuple[str, str, str], dict[str, float]] = {}
    for record in records:
        label = model_label(record)
        if label not in models:
            models.append(label)
        for metric, value in record["metrics"].items():
            if isinstance(value, int | float) and pattern.search(metric):
                cells.setdefault((record["dataset"], record["task"], metric), {})[label] = float(value)
    header = ["dataset", "task", "metric", *models]
    rows = [[*key, *(cells[key].get(m) for m in models)] for key in sorted(cells)]
    return header, rows


def to_csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buf.getvalue()


def to_markdown(header: list[str], rows: list[list[Any]]) -> str:
    """Values as percentages with two decimals; the best value in each row in bold."""

    def fmt(v: Any, best: float | None) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        if not isinstance(v, float):
            return str(v)
        text = f"{100 * v:.2f}"
        return f"**{text}**" if v == best else text

    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|",
    ]
    for row in rows:
        values = [v for v in row[3:] if isinstance(v, float) and not math.isnan(v)]
        best = max(values) if len(values) > 1 else None  # bold only where models are compared
        lines.append("| " + " | ".join(fmt(v, best) for v in row) + " |")
    return "\n".join(lines) + "\n"
