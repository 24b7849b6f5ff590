"""Evaluation suites: several evaluators over several datasets, one results file (and the CLIP_benchmark
result files derived from it).

A suite is a YAML file:

    name: world
    datasets:
      world_test:
        source: {source: world, split: test, size: 1000, captions: 5, partial_caption_prob: 0.0}
        train: {source: world, split: train, size: 5000, partial_caption_prob: 0.0}  # for fitted evaluators
      digits:
        source: {source: digits, split: test}
        train: {source: digits, split: train}
        tasks: [zero_shot, linear_probe]     # this dataset only; default: the suite's tasks
      coco_test:                             # Karpathy's COCO test split: retrieval over all captions
        source: {source: karpathy, path: dataset_coco.json, split: test, image_root: coco/}
        tasks: [retrieval]
      pets:                                  # any labelled manifest: class names per dataset
        source: {source: csv, path: pets.csv, label_keys: [breed], classnames: en_classnames.json,
                 templates: en_zeroshot_classification_templates.json, dataset_name: pets}
        tasks: [zero_shot]
    tasks:
      - zero_shot
      - retrieval
      - {name: linear_probe}
      - {name: knn, k: 20}

Embeddings of every split are cached under the run folder (keyed by checkpoint, source options,
sample limit and precision), so running a second suite, or the few-shot sweep, over the same data does
not re-encode.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pydantic
import torch
import yaml

from coalign.build import LoadedRun, build_source
from coalign.config import EvaluatorSpec, SourceSpec, evaluator_specs
from coalign.data.sources.base import Source
from coalign.evaluate.embed import EmbeddedSet, embed_eval_set
from coalign.evaluate.results import Results, merge_results, write_benchmark_files, write_results
from coalign.evaluate.run import evaluate
from coalign.recipe_checks import evaluator_errors
from coalign.registry import EVALUATORS, SOURCES, ConfigError, StrictModel, format_validation_error
from coalign.runtime import Runtime

CACHE_VERSION = 3  # 2: the key holds the precision; 3: and the class names
RESULTS_FILE = "results.json"
BENCHMARK_FOLDER = "clip_benchmark"


class DatasetSpec(StrictModel):
    source: SourceSpec
    train: SourceSpec | None = None  # the labelled training split, for linear probe, kNN, CoOp
    tasks: list[str | EvaluatorSpec] | None = None


class Suite(StrictModel):
    name: str = "suite"
    datasets: dict[str, DatasetSpec] = pydantic.Field(min_length=1)
    tasks: list[str | EvaluatorSpec] = ["zero_shot", "retrieval"]
    batch_size: int = pydantic.Field(256, gt=0)
    max_samples: int | None = None


def load_suite(path: Path | str, overrides: dict[str, Any] | None = None) -> Suite:
    """Parse and check a suite file: evaluator names and options, source names and options."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"suite file '{path}' does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    raw.update(overrides or {})
    try:
        suite = Suite(**raw)
    except pydantic.ValidationError as err:
        raise ConfigError(format_validation_error(err, f"suite {path.name}", Suite)) from None
    errors = evaluator_errors(suite.tasks, "tasks")
    for name, ds in suite.datasets.items():
        errors += evaluator_errors(ds.tasks or [], f"datasets.{name}.tasks", train_split=ds.train is not None)
        fitted = [s.name for s in evaluator_specs(suite.tasks) if _needs_train(s.name)]
        if ds.tasks is None and ds.train is None and fitted:
            errors.append(
                f"datasets.{name}: the suite's tasks {', '.join(fitted)} fit on a labelled training split, "
                "which this dataset lacks; give it a `train:` split or its own `tasks:`"
            )
        for split, spec in (("source", ds.source), ("train", ds.train)):
            if spec is None:
                continue
            try:
                SOURCES.get(spec.source)
                SOURCES.validate(spec.source, spec.options(), f"datasets.{name}.{split}")
            except ConfigError as err:
                errors.append(f"datasets.{name}.{split}: {err}")
    if errors:
        raise ConfigError(f"invalid suite '{path}':\n" + "\n".join(errors))
    return suite


def _needs_train(name: str) -> bool:
    return name in EVALUATORS and bool(getattr(EVALUATORS.get(name), "needs_train", False))


class EmbeddingCache:
    """Embedded splits on disk under `folder`, keyed by (checkpoint, source options, limit, precision,
    class names)."""

    def __init__(
        self, run: LoadedRun, folder: Path, runtime: Runtime, batch_size: int, progress: bool = True
    ):
        self.run, self.folder, self.runtime = run, folder, runtime
        self.batch_size, self.progress = batch_size, progress
        self.hits = self.misses = 0

    def key(self, spec: SourceSpec, limit: int | None, source: Source) -> str:
        identity = {
            "v": CACHE_VERSION,
            "checkpoint": str(self.run.checkpoint.resolve()),
            "step": self.run.step,
            "source": spec.model_dump(mode="json"),
            "limit": limit,
            "precision": self.runtime.precision,
            # Cached labels are class indices: a classnames file reordered since must not reuse them.
            "classes": {k: t.classnames for k, t in sorted(source.zero_shot_tasks().items())},
        }
        return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    def get(self, name: str, spec: SourceSpec, source: Source, limit: int | None) -> EmbeddedSet:
        path = self.folder / f"{name}-{self.key(spec, limit, source)}.pt"
        if path.is_file():
            self.hits += 1
            data = torch.load(path, weights_only=False)
            return EmbeddedSet(**data, tasks=source.zero_shot_tasks())
        self.misses += 1
        eset = embed_eval_set(
            name,
            self.run.model,
            self.run.transforms,
            source,
            self.runtime,
            self.batch_size,
            limit,
            self.progress,
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in vars(eset).items() if k != "tasks"}
        tmp = path.with_suffix(".tmp")
        torch.save(data, tmp)
        tmp.replace(path)  # atomic: a crash never leaves a half-written cache entry
        return eset


def evaluate_dataset(
    run: LoadedRun,
    suite: Suite,
    name: str,
    tasks: list[str | EvaluatorSpec] | None,
    cache: EmbeddingCache,
) -> Results:
    """`tasks` (default: the dataset's, else the suite's) on one dataset, on the cache's runtime."""
    ds = suite.datasets[name]
    test = build_source(ds.source, f"datasets.{name}.source")
    train = build_source(ds.train, f"datasets.{name}.train") if ds.train is not None else None
    specs = {"test": ds.source, "train": ds.train}

    def embedded(split: str, dataset: str, source: Source) -> EmbeddedSet:
        limit = suite.max_samples if split == "test" else None
        return cache.get(f"{dataset}-{split}", specs[split], source, limit)

    if tasks is None:
        tasks = ds.tasks if ds.tasks is not None else suite.tasks
    return evaluate(
        run.model,
        run.transforms,
        {name: test},
        tasks,
        cache.runtime,
        suite.batch_size,
        suite.max_samples,
        train_sources={name: train} if train is not None else None,
        embedded=embedded,
    )


def run_suite(
    run: LoadedRun,
    suite: Suite,
    out_dir: Path,
    runtime: Runtime,
    model_name: str | None = None,
    progress: bool = True,
    cache_dir: Path | None = None,
) -> tuple[Results, list[Path]]:
    """Evaluate `run` on every dataset of `suite` on `runtime`; write `out_dir/results.json` and the
    CLIP_benchmark files derived from it into `out_dir/clip_benchmark/`. Returns the results and the
    CLIP_benchmark files."""
    cache = EmbeddingCache(run, cache_dir or run_cache_dir(run), runtime, suite.batch_size, progress)
    parts = [evaluate_dataset(run, suite, name, None, cache) for name in suite.datasets]
    results = merge_results(parts).about(
        model_name or run.recipe.name, run.checkpoint, run.step, f"suite {suite.name}"
    )
    write_results(out_dir / RESULTS_FILE, results)
    return results, write_benchmark_files(results, out_dir / BENCHMARK_FOLDER)


def run_cache_dir(run: LoadedRun) -> Path:
    return run.run_dir / "eval" / "cache"
