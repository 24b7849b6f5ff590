"""What every evaluator shares: the `Metric` record it returns, the `Evaluator` base class, and the
`EvalContext` it is called with.

An evaluator is a registered class with a pydantic `Config`; a recipe or suite names it with its
options (`{name: knn, k: 10}`), the options are validated once when the recipe or suite loads, and
`EVALUATORS.create(name, **options)` builds it. Calling it on an embedded evaluation set returns
`Metric` records: every field a consumer needs (which evaluator, dataset, modality or pair, label,
metric, the CLIP_benchmark task, whether it is a headline number) is a field, so nothing downstream
parses a key. `Metric.key` is the flat `evaluator/target/label/name` string, a derived view for logs
and TensorBoard only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from coalign.data.sources.base import Source
from coalign.data.transforms.base import Transform
from coalign.evaluate.embed import EmbeddedSet, labelled_features
from coalign.models.model import MultimodalModel
from coalign.registry import EVALUATORS, ConfigError, StrictModel
from coalign.runtime import Runtime


@dataclass(frozen=True)
class Metric:
    """One number an evaluator measured."""

    evaluator: str  # registry name, e.g. "zero_shot"
    dataset: str  # the evaluation set, e.g. "world_test"
    target: str  # what was evaluated: a modality "image", a pair "audio-image", a subset "audio+image"
    label: str | None  # the label key of a classification ("shape"); None for retrieval
    name: str  # CLIP_benchmark's metric name: "acc1", "image_retrieval_recall@5", "lp_acc1", ...
    value: float
    task: str  # CLIP_benchmark task: "zeroshot_classification", "zeroshot_retrieval", "linear_probe", ...
    headline: bool = False  # shown by default in summaries and comparison tables

    @property
    def key(self) -> str:
        """`evaluator/target[/label]/name`: the flat view for logs and TensorBoard; never parsed."""
        return "/".join(p for p in (self.evaluator, self.target, self.label, self.name) if p is not None)

    @property
    def identity(self) -> tuple[str, str, str, str | None, str]:
        """What the value is of: two records with one identity measure the same thing."""
        return (self.dataset, self.evaluator, self.target, self.label, self.name)

    def to_json(self) -> dict:
        return {
            "evaluator": self.evaluator,
            "dataset": self.dataset,
            "target": self.target,
            "label": self.label,
            "name": self.name,
            "value": self.value,
            "task": self.task,
            "headline": self.headline,
        }

    @classmethod
    def from_json(cls, data: dict) -> Metric:
        return cls(
            str(data["evaluator"]),
            str(data["dataset"]),
            str(data["target"]),
            None if data.get("label") is None else str(data["label"]),
            str(data["name"]),
            float(data["value"]),
            str(data["task"]),
            bool(data.get("headline", False)),
        )


def metric_dict(metrics: Iterable[Metric]) -> dict[str, float]:
    """{key: value}: the flat view of some records (for logs, printing and tests)."""
    return {m.key: m.value for m in metrics}


@dataclass
class EvalContext:
    """What an evaluator may need beyond the pooled embeddings of the set it is given."""

    model: MultimodalModel | None
    transforms: dict[str, Transform]
    source: Source | None  # the evaluation source itself (late interaction re-reads it)
    encode_text: Callable[[list[str]], torch.Tensor] | None  # list[str] -> (n, E) normalised; None: no text
    runtime: Runtime
    batch_size: int = 256
    max_samples: int | None = None
    # The labelled training split of this dataset, embedded the same way, for evaluators that fit
    # something (linear probe, kNN, CoOp); None when the suite names no `train` source for it.
    train: EmbeddedSet | None = None


class NoOptions(StrictModel):
    """An evaluator without options still rejects unknown keys."""


class Evaluator:
    """Base of every evaluator: `Config` (its options), `task` (CLIP_benchmark's task name; default:
    the evaluator's own name), `headlines` (its headline metric names), `needs_train` (it fits on a
    labelled training split, which only suites provide).

    Register a subclass with `@register("name")`: that is the one edit adding an evaluator takes.
    """

    name: ClassVar[str] = ""  # set by `register`
    Config: ClassVar[type[StrictModel]] = NoOptions
    task: ClassVar[str | None] = None
    headlines: ClassVar[frozenset[str]] = frozenset()
    needs_train: ClassVar[bool] = False

    def __init__(self, config: StrictModel | None = None):
        self.config = config if config is not None else self.Config()

    def __call__(self, eset: EmbeddedSet, ctx: EvalContext) -> list[Metric]:
        raise NotImplementedError

    def benchmark(self) -> dict:
        """Settings CLIP_benchmark stores beside the metrics (a few-shot probe's `fewshot_k`)."""
        return {}

    def describe(self) -> dict:
        """What the results file records of this evaluator: its name, the options that differ from the
        defaults, and its CLIP_benchmark settings."""
        options = self.config.model_dump(mode="json", exclude_defaults=True)
        return {"name": self.name, "options": options, "benchmark": self.benchmark()}

    def metric(
        self,
        eset: EmbeddedSet,
        target: str,
        label: str | None,
        name: str,
        value: float,
        headline: bool | None = None,
    ) -> Metric:
        """One record of this evaluator; `headline` defaults to `name in self.headlines`."""
        is_headline = name in self.headlines if headline is None else headline
        return Metric(
            self.name, eset.name, target, label, name, float(value), self.task or self.name, is_headline
        )

    def metrics(
        self, eset: EmbeddedSet, target: str, label: str | None, values: dict[str, float]
    ) -> list[Metric]:
        return [self.metric(eset, target, label, name, v) for name, v in values.items()]

    def require_train(self, eset: EmbeddedSet, ctx: EvalContext) -> EmbeddedSet:
        """The dataset's training split, or an error saying how to name one."""
        if ctx.train is None:
            raise ConfigError(
                f"evaluator '{self.name}' fits on a training split, but dataset '{eset.name}' has none; "
                "name one as `train:` beside the dataset's source in the suite"
            )
        return ctx.train


class FittedEvaluator(Evaluator):
    """An evaluator that fits something on the dataset's labelled training split (k shots per class
    when its Config sets `shots`): linear probe, kNN, CoOp. A subclass implements `fit` (one modality,
    one label: features in, metrics out) or, to see both splits whole, `scores`."""

    needs_train = True

    def benchmark(self) -> dict:
        shots = getattr(self.config, "shots", None)
        return {"fewshot_k": shots} if shots is not None else {}

    def __call__(self, eset: EmbeddedSet, ctx: EvalContext) -> list[Metric]:
        scores = self.scores(eset, self.require_train(eset, ctx), ctx)
        return [
            m for (target, label), vals in scores.items() for m in self.metrics(eset, target, label, vals)
        ]

    def scores(self, eset: EmbeddedSet, train: EmbeddedSet, ctx: EvalContext) -> dict:
        """{(modality, label key): {metric: value}}, fitting on the runtime's device."""
        device = ctx.runtime.device
        return {
            (modality, key): self.fit(*(t.to(device) for t in (train_x, train_y, test_x, test_y)), c)
            for modality, key, train_x, train_y, test_x, test_y, c in labelled_features(eset, train)
        }

    def fit(self, train_x, train_y, test_x, test_y, num_classes: int) -> dict[str, float]:
        raise NotImplementedError


def register(name: str) -> Callable[[type[Evaluator]], type[Evaluator]]:
    """`@register("zero_shot")` on an Evaluator subclass: names it and adds it to `EVALUATORS`."""

    def deco(cls: type[Evaluator]) -> type[Evaluator]:
        if not (isinstance(cls, type) and issubclass(cls, Evaluator)):
            raise TypeError(f"evaluator '{name}' must be an Evaluator subclass, got {cls!r}")
        cls.name = name
        return EVALUATORS.register(name)(cls)

    return deco


def build_evaluator(name: str, options: dict | None = None, where: str = "") -> Evaluator:
    """The registered evaluator `name` with `options` (validated against its Config)."""
    return EVALUATORS.create(name, where or f"evaluator '{name}'", **(options or {}))
