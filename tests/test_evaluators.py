"""Evaluators as registered classes: every entry honours the contract, a new one needs no other edit,
and evaluators that need a training split are refused where there is none, before any work."""

from __future__ import annotations

import json

import pydantic
import pytest
import torch
import torch.nn.functional as F

from coalign.config import load_recipe
from coalign.data.sources.base import ZeroShotTask
from coalign.evaluate.base import EvalContext, Evaluator, Metric, register
from coalign.evaluate.embed import EmbeddedSet
from coalign.evaluate.results import (
    benchmark_records,
    comparison,
    load_scores,
    read_results,
    write_benchmark_files,
    write_results,
)
from coalign.evaluate.run import evaluate
from coalign.registry import EVALUATORS, ConfigError, StrictModel
from coalign.runtime import Runtime
from helpers import suite_error

N, C, E = 12, 3, 8


def toy_set(name: str = "toy") -> EmbeddedSet:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(N) % C
    emb = F.normalize(torch.randn(N, E, generator=gen), dim=-1)
    captions = F.normalize(emb + 0.1 * torch.randn(N, E, generator=gen), dim=-1)
    task = ZeroShotTask("y", ["a", "b", "c"], ["{}"])
    return EmbeddedSet(name, {"image": emb}, captions, torch.arange(N), {"y": labels}, {"y": task})


def context(train: EmbeddedSet | None = None) -> EvalContext:
    classes = F.normalize(torch.randn(C, E, generator=torch.Generator().manual_seed(1)), dim=-1)
    words = dict(zip("abc", classes, strict=True))
    encode = lambda texts: torch.stack([words[t] for t in texts])  # noqa: E731
    return EvalContext(None, {}, None, encode, Runtime.cpu(), 64, None, train)


@pytest.mark.parametrize("name", EVALUATORS.names())
def test_every_evaluator_is_a_registered_class_with_a_config(name):
    cls = EVALUATORS.get(name)
    assert isinstance(cls, type) and issubclass(cls, Evaluator) and cls.name == name
    assert issubclass(cls.Config, StrictModel)
    with pytest.raises(ConfigError, match=rf"{name}\.no_such_option: unknown key"):
        EVALUATORS.create(name, name, no_such_option=1)
    evaluator = EVALUATORS.create(name)
    assert evaluator.describe()["name"] == name
    if cls.needs_train:
        with pytest.raises(ConfigError, match="fits on a training split"):
            evaluator(toy_set(), context())
        return
    if name == "retrieval_late":  # re-encodes tokens: needs a model (tested in test_filip.py)
        return
    if getattr(cls, "needs_fusion", False):  # scores pairs with a fusion part (tests/test_rerank.py)
        return
    if getattr(cls, "needs_decoder", False):  # generates captions (the coca smoke run, test_recipes.py)
        with pytest.raises(ConfigError, match="this model has none"):
            evaluator(toy_set(), context())
        return
    with torch.no_grad():
        records = evaluator(toy_set(), context())
    assert all(isinstance(m, Metric) and m.evaluator == name and m.dataset == "toy" for m in records)
    assert all(m.task == (cls.task or name) for m in records)


class ToyOptions(StrictModel):
    scale: float = pydantic.Field(1.0, gt=0)


class Toy(Evaluator):
    """Mean cosine of each sample with its caption, times `scale`."""

    Config = ToyOptions
    task = "toy_task"
    headlines = frozenset({"toy_score"})

    def __call__(self, eset: EmbeddedSet, ctx: EvalContext) -> list[Metric]:
        score = float((eset.embeddings["image"] * eset.captions).sum(-1).mean()) * self.config.scale
        return [
            self.metric(eset, "image", None, "toy_score", score),
            self.metric(eset, "image", None, "toy_spread", 0.0),
        ]


@pytest.fixture
def toy_registered():
    register("toy_cosine")(Toy)
    yield Toy
    del EVALUATORS._entries["toy_cosine"]  # leave the registry as the other tests expect it


def test_a_new_evaluator_needs_no_other_edit(toy_registered, tmp_path):
    """Registering a class is all: its records reach the results file, the CLIP_benchmark files and
    the comparison table, with the task and headline it declares."""
    eset = toy_set("world_test")
    results = evaluate(
        torch.nn.Identity(),  # embedding is replaced below; the model is only switched to eval mode
        {},
        {"world_test": None},
        ["retrieval", {"name": "toy_cosine", "scale": 2.0}],
        Runtime.cpu(),
        embedded=lambda split, name, source: eset,
    ).about("demo", "runs/demo/checkpoints/step_00000010", 10, "eval")
    expected = float((eset.embeddings["image"] * eset.captions).sum(-1).mean()) * 2.0
    path = write_results(tmp_path / "results.json", results)
    stored = read_results(path)
    (toy,) = [m for m in stored.metrics if m.name == "toy_score"]
    assert toy.evaluator == "toy_cosine" and toy.task == "toy_task" and toy.headline
    assert toy.value == pytest.approx(expected)
    assert stored.flat()["world_test"]["toy_cosine/image/toy_score"] == pytest.approx(expected)
    assert stored.datasets["world_test"].evaluators[1]["options"] == {"scale": 2.0}

    files = write_benchmark_files(stored, tmp_path / "clip_benchmark")
    records = [json.loads(f.read_text()) for f in files]
    toy_record = next(r for r in records if r["task"] == "toy_task")
    assert toy_record["dataset"] == "world_test" and toy_record["pretrained"] == "step_00000010"
    assert toy_record["metrics"] == {"toy_score": pytest.approx(expected), "toy_spread": 0.0}
    assert toy_record in benchmark_records(stored)

    for scores in (load_scores([path]), load_scores([tmp_path])):
        header, rows = comparison(scores)
        table = {tuple(r[:3]): r[3:] for r in rows}
        assert table[("world_test", "toy_task", "toy_score")] == [pytest.approx(expected)]
        assert ("world_test", "toy_task", "toy_spread") not in table  # not a headline
        assert ("world_test", "zeroshot_retrieval", "image_retrieval_recall@1") in table


@pytest.mark.parametrize("name", ["linear_probe", "knn", "coop"])
def test_train_split_evaluators_in_a_recipe_fail_at_load(name):
    with pytest.raises(ConfigError) as err:
        load_recipe("demo", [f"eval.evaluators=[zero_shot, {{name: {name}}}]"])
    (line,) = str(err.value).splitlines()  # one mistake, one line
    assert line.startswith("invalid recipe: eval.evaluators.1: ")
    assert f"evaluator '{name}' fits on a labelled training split" in line and "--suite" in line


def test_suite_dataset_without_train_split_fails_at_load(tmp_path):
    text = suite_error(
        tmp_path,
        "datasets:\n"
        "  with_train:\n    source: {source: world, split: test}\n    train: {source: world, split: train}\n"
        "  no_train:\n    source: {source: world, split: test}\n"
        "  own_tasks:\n    source: {source: world, split: test}\n    tasks: [zero_shot, knn]\n"
        "tasks: [zero_shot, linear_probe]\n",
    )
    assert "datasets.no_train: the suite's tasks linear_probe fit on a labelled training split" in text
    assert "datasets.own_tasks.tasks.1: evaluator 'knn' fits on a labelled training split" in text
    assert "with_train" not in text
