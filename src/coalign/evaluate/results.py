"""The one results format, the CLIP_benchmark files derived from it, and comparison tables.

Every evaluation (the trainer's periodic and final ones, `coalign eval`, suites) writes one
`Results` file, atomically (`coalign.io`), in one layout:

    {"format": "coalign-results", "version": 1,
     "model": "demo", "checkpoint": "runs/demo/checkpoints/step_00000600", "step": 600, "by": "train",
     "datasets": {"world_test": {"samples": 1000, "skipped": {"empty_caption": 3}, "evaluators": [
         {"name": "zero_shot", "options": {}, "benchmark": {}},
         {"name": "knn", "options": {"shots": 4}, "benchmark": {"fewshot_k": 4}}]}},
     "metrics": [{"evaluator": "zero_shot", "dataset": "world_test", "target": "image", "label": "shape",
                  "name": "acc1", "value": 0.91, "task": "zeroshot_classification", "headline": true}, ...]}

CLIP_benchmark result files are derived from the records by `benchmark_records`: one JSON object per
(dataset, model, task),

    {"dataset": "cifar10", "model": "ViT-B-32", "pretrained": "laion400m_e32",
     "task": "zeroshot_classification", "metrics": {"acc1": 0.9074, "acc5": 0.998}, "language": "en"}

whose dataset is the coalign dataset name, followed by the record's target when it is not the image
(CLIP_benchmark only knows images) and by its label when the dataset has several (the world classifies
shape, color, size and position), e.g. `world_test/shape`, `world_test/audio/shape`,
`world_test/audio-image`; the task and metric names are the records' own, and beside the metrics stand
the settings the evaluator declares for CLIP_benchmark (`fewshot_k` of a few-shot linear probe).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from coalign.evaluate.base import Metric
from coalign.io import atomic_write_json

FORMAT = "coalign-results"
VERSION = 1
LAYOUT_KEYS = ("dataset", "model", "pretrained", "task", "metrics", "language")
# The headline metrics of CLIP_benchmark's own tasks, for its files (which carry no headline flag);
# coalign's records say for themselves which of their metrics are headlines.
CLIP_BENCHMARK_HEADLINES = {
    "zeroshot_classification": {"acc1"},
    "zeroshot_retrieval": {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5)},
    "linear_probe": {"lp_acc1"},
}


@dataclass(frozen=True)
class DatasetInfo:
    """What an evaluation saw of one dataset: the samples it kept, those it skipped (by reason), and
    the evaluators that ran on it: `{name, options (those not at their defaults), benchmark (settings
    CLIP_benchmark stores beside the metrics)}`."""

    samples: int
    skipped: dict[str, int] = field(default_factory=dict)
    evaluators: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "skipped": dict(self.skipped), "evaluators": self.evaluators}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatasetInfo:
        return cls(int(data["samples"]), dict(data.get("skipped") or {}), list(data.get("evaluators") or []))


@dataclass
class Results:
    """The records of one evaluation, and what was evaluated."""

    metrics: list[Metric]
    datasets: dict[str, DatasetInfo]
    model: str = ""
    checkpoint: str = ""
    step: int | None = None
    by: str = ""  # who evaluated: "train", "eval", "suite <name>"

    def of(self, dataset: str) -> list[Metric]:
        return [m for m in self.metrics if m.dataset == dataset]

    def flat(self) -> dict[str, dict[str, float]]:
        """{dataset: {key: value}} with `samples` and `skipped/<reason>`: the view for logs and printing."""
        out: dict[str, dict[str, float]] = {}
        for name, info in self.datasets.items():
            out[name] = {"samples": float(info.samples)}
        for m in self.metrics:
            out.setdefault(m.dataset, {})[m.key] = m.value
        for name, info in self.datasets.items():
            out[name].update({f"skipped/{k}": float(v) for k, v in info.skipped.items()})
        return out

    def headline(self) -> list[Metric]:
        return [m for m in self.metrics if m.headline]

    def about(self, model: str, checkpoint: str | Path, step: int | None, by: str) -> Results:
        """The same records, saying which model and checkpoint they measure and who evaluated."""
        return replace(self, model=model, checkpoint=str(checkpoint), step=step, by=by)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "checkpoint": self.checkpoint,
            "step": self.step,
            "by": self.by,
            "datasets": {k: v.to_json() for k, v in self.datasets.items()},
            "metrics": [m.to_json() for m in self.metrics],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "results") -> Results:
        if not is_results(data):
            raise ValueError(f'\'{where}\' is not a coalign results file (no "format": "{FORMAT}")')
        if data.get("version") != VERSION:
            raise ValueError(
                f"'{where}': results version {data.get('version')!r}, this coalign reads {VERSION}"
            )
        return cls(
            [Metric.from_json(m) for m in data["metrics"]],
            {k: DatasetInfo.from_json(v) for k, v in data["datasets"].items()},
            str(data.get("model") or ""),
            str(data.get("checkpoint") or ""),
            None if data.get("step") is None else int(data["step"]),
            str(data.get("by") or ""),
        )


def is_results(data: Any) -> bool:
    return isinstance(data, dict) and data.get("format") == FORMAT


def write_results(path: Path, results: Results) -> Path:
    """The one writer of results files (atomic: a crash leaves the old file or the new one)."""
    atomic_write_json(Path(path), results.to_json())
    return Path(path)


def read_results(path: Path) -> Results:
    return Results.from_json(json.loads(Path(path).read_text()), str(path))


# --------------------------------------------------------------------------------------------- CLIP_benchmark


def benchmark_dataset(m: Metric, several_labels: bool) -> str:
    """The CLIP_benchmark dataset name of a record (see the module docstring)."""
    name = m.dataset if m.target == "image" else f"{m.dataset}/{m.target}"
    return f"{name}/{m.label}" if m.label is not None and several_labels else name


def _benchmark_groups(results: Results) -> list[tuple[str, dict[str, Any]]]:
    """(evaluator, CLIP_benchmark record) per (dataset name, task, evaluator), in the records' order."""
    labels: dict[str, set[str]] = {}
    for m in results.metrics:
        if m.label is not None:
            labels.setdefault(m.dataset, set()).add(m.label)
    pretrained = Path(results.checkpoint).name if results.checkpoint else ""
    settings = {
        (name, e["name"]): e.get("benchmark") or {}
        for name, info in results.datasets.items()
        for e in info.evaluators
    }
    grouped: dict[tuple[str, str, str], dict[str, Any]] = {}
    for m in results.metrics:
        name = benchmark_dataset(m, len(labels.get(m.dataset, ())) > 1)
        record = grouped.setdefault(
            (name, m.task, m.evaluator),
            {
                "dataset": name,
                "model": results.model,
                "pretrained": pretrained,
                "task": m.task,
                "metrics": {},
                "language": "en",
            },
        )
        if not record["metrics"]:
            record["metrics"].update(settings.get((m.dataset, m.evaluator), {}))
        record["metrics"][m.name] = m.value
    return [(evaluator, record) for (_, _, evaluator), record in grouped.items()]


def benchmark_records(results: Results) -> list[dict[str, Any]]:
    """The CLIP_benchmark records of some results: the one place they are derived."""
    return [record for _, record in _benchmark_groups(results)]


def record_filename(record: dict[str, Any], suffix: str = "") -> str:
    """CLIP_benchmark's `{dataset}_{pretrained}_{model}_{language}_{task}.json` naming, made safe."""
    parts = [
        record["dataset"],
        record["pretrained"],
        record["model"],
        record["language"],
        record["task"],
        suffix,
    ]
    return re.sub(r"[^A-Za-z0-9._@+-]+", "_", "_".join(p for p in parts if p)) + ".json"


def write_benchmark_files(results: Results, out_dir: Path) -> list[Path]:
    """One CLIP_benchmark file per record of `benchmark_records(results)` in `out_dir`. Two evaluators
    of one task on one target (`retrieval` and `retrieval_late`) would share a name: the second file
    takes the evaluator's name as a suffix."""
    paths: list[Path] = []
    for evaluator, record in _benchmark_groups(results):
        path = out_dir / record_filename(record)
        if path in paths:
            path = out_dir / record_filename(record, evaluator)
        atomic_write_json(path, record)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class Score:
    """One value of one model, in CLIP_benchmark's terms: what comparison tables are made of."""

    dataset: str
    task: str
    metric: str
    model: str  # "model (pretrained)"
    value: float
    headline: bool


def model_label(record: dict[str, Any]) -> str:
    return f"{record['model']} ({record['pretrained']})" if record.get("pretrained") else record["model"]


def scores_of(results: Results) -> list[Score]:
    """The scores of coalign results: CLIP_benchmark naming, headline flags from the records."""
    labels = {d: {m.label for m in results.of(d) if m.label is not None} for d in results.datasets}
    label = model_label(
        {"model": results.model, "pretrained": Path(results.checkpoint).name if results.checkpoint else ""}
    )
    return [
        Score(
            benchmark_dataset(m, len(labels.get(m.dataset, ())) > 1),
            m.task,
            m.name,
            label,
            m.value,
            m.headline,
        )
        for m in results.metrics
    ]


def _scores_of_record(record: dict[str, Any]) -> list[Score]:
    headlines = CLIP_BENCHMARK_HEADLINES.get(record["task"], set())
    return [
        Score(
            record["dataset"], record["task"], metric, model_label(record), float(value), metric in headlines
        )
        for metric, value in record["metrics"].items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]


def load_scores(paths: Iterable[Path]) -> list[Score]:
    """Scores from coalign results files and CLIP_benchmark result files (folders are searched for
    *.json). A results file and the CLIP_benchmark files derived from it give the same scores once;
    a file that is neither says which CLIP_benchmark key it lacks."""
    found: dict[tuple[str, str, str, str], Score] = {}
    for path in paths:
        files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise FileNotFoundError(f"no result files (*.json) under '{path}'")
        for f in files:
            data = json.loads(f.read_text())
            if is_results(data):
                scores = scores_of(Results.from_json(data, str(f)))
            else:
                missing = [k for k in ("dataset", "model", "task", "metrics") if k not in data]
                if missing:
                    raise ValueError(f"'{f}' is not a CLIP_benchmark result file: no {', '.join(missing)}")
                scores = _scores_of_record(data)
            for s in scores:
                key = (s.dataset, s.task, s.metric, s.model)
                old = found.get(key)
                found[key] = s if old is None else replace(s, headline=s.headline or old.headline)
    return list(found.values())


def comparison(scores: list[Score], metrics: str | None = None) -> tuple[list[str], list[list[Any]]]:
    """A pivot: one row per (dataset, task, metric), one column per model. `metrics` is a regular
    expression over metric names (default: the headline metrics). Returns (header, rows)."""
    pattern = re.compile(metrics) if metrics else None
    models: list[str] = []
    cells: dict[tuple[str, str, str], dict[str, float]] = {}
    for s in scores:
        if s.model not in models:
            models.append(s.model)
        if (pattern.search(s.metric) if pattern else s.headline) and math.isfinite(s.value):
            cells.setdefault((s.dataset, s.task, s.metric), {})[s.model] = s.value
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


def format_table(results: Results) -> str:
    """The headline numbers, dataset by dataset, for printing."""
    rows = results.headline()
    if not rows:
        return "(no results)"
    width = max(len(m.key) for m in rows)
    lines, last = [], None
    for m in rows:
        if m.dataset != last:
            lines.append(f"\n{m.dataset}")
            last = m.dataset
        lines.append(f"  {m.key:<{width}}  {100 * m.value:6.2f}%")
    return "\n".join(lines).lstrip("\n")


def merge_results(parts: list[Results]) -> Results:
    """The records of several evaluations of one model (a suite's datasets) as one."""
    return Results(
        [m for part in parts for m in part.metrics],
        {name: info for part in parts for name, info in part.datasets.items()},
    )


# --------------------------------------------------------------------------------------------- a run's files

RUN_RESULTS = "results.json"  # RUN/results.json: the trainer's final evaluation


def step_results_path(run_dir: Path, step: int) -> Path:
    """RUN/eval/step_N.json: an evaluation of the run at step N (by the trainer or `coalign eval`)."""
    return Path(run_dir) / "eval" / f"step_{step:08d}.json"


def run_results_files(run_dir: Path) -> list[Path]:
    """Every results file of a run: its evaluations by step, then the suites' (RUN/eval/*/results.json)."""
    folder = Path(run_dir) / "eval"
    return sorted(folder.glob("step_*.json")) + sorted(folder.glob(f"*/{RUN_RESULTS}"))
