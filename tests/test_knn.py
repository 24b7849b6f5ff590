"""Weighted kNN: a hand-worked vote, brute force on random features, chunking, and the evaluator."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from coalign.evaluate.base import EvalContext, metric_dict
from coalign.evaluate.embed import EmbeddedSet
from coalign.evaluate.knn import knn_classify, knn_scores, nearest
from coalign.registry import EVALUATORS, ConfigError
from coalign.runtime import Runtime

METRICS = {"knn_acc1", "knn_mean_per_class_recall"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny problems: a second OpenMP thread only adds waits on a loaded machine."""
    torch.set_num_threads(1)


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def clusters(n: int, classes: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))  # (C, D)
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    return centres[y] + spread * torch.randn(n, dim, generator=gen), y


def brute_votes(train_x, train_y, test_x, num_classes, k, temperature) -> torch.Tensor:
    """exp(sim / T) summed per class over the k most similar training rows, one test row at a time."""
    train = F.normalize(train_x.double(), dim=1)
    votes = torch.zeros(len(test_x), num_classes, dtype=torch.float64)
    for i, q in enumerate(F.normalize(test_x.double(), dim=1)):
        sims = [(float(q @ t), int(c)) for t, c in zip(train, train_y, strict=True)]
        for s, c in sorted(sims, reverse=True)[:k]:
            votes[i, c] += math.exp(s / temperature)
    return votes


def test_weighted_vote_differs_from_majority():
    # Query at 0 degrees. One class-0 neighbour at 0 degrees (sim 1), two class-1 neighbours at +-60
    # (sim 0.5), a far class-0 sample at 180 (not among the k = 3). A plain majority says class 1;
    # with T = 0.07 the vote is e^(1/0.07) = 1.6e6 for class 0 vs 2 e^(0.5/0.07) = 2.5e3 for class 1.
    train_x = torch.tensor([unit(0), unit(60), unit(-60), unit(180)])
    train_y = torch.tensor([0, 1, 1, 0])
    test_x, test_y = torch.tensor([unit(0)]), torch.tensor([0])
    scores = knn_scores(train_x, train_y, test_x, 2, k=3, temperature=0.07).double()
    expected = torch.tensor([[math.exp(1 / 0.07), 2 * math.exp(0.5 / 0.07)]], dtype=torch.float64)
    torch.testing.assert_close(scores / scores[0, 0], expected / expected[0, 0], rtol=1e-5, atol=0)
    torch.testing.assert_close(
        scores / scores[0, 0], brute_votes(train_x, train_y, test_x, 2, 3, 0.07) / expected[0, 0]
    )
    assert knn_classify(train_x, train_y, test_x, test_y, 2, k=3)["knn_acc1"] == 1.0
    # A large temperature makes the weights nearly equal: the majority (class 1) wins.
    assert knn_classify(train_x, train_y, test_x, test_y, 2, k=3, temperature=100.0)["knn_acc1"] == 0.0


def test_matches_brute_force_and_chunking_is_exact():
    train_x, train_y = clusters(60, 7, 5, spread=1.5, seed=0)
    test_x, test_y = clusters(25, 7, 5, spread=1.5, seed=1)
    # knn_scores scales each row by exp(-max sim / T); the brute force side is scaled the same way.
    top = (F.normalize(test_x.double(), dim=1) @ F.normalize(train_x.double(), dim=1).T).max(1).values
    for k, t in [(1, 0.07), (5, 0.1), (20, 0.5), (100, 0.07)]:  # k=100 > N: capped at all 60
        opts = {"k": k, "temperature": t}
        whole = knn_scores(train_x, train_y, test_x, 7, **opts, chunk=10**6, train_chunk=10**6)
        brute = brute_votes(train_x, train_y, test_x, 7, min(k, 60), t) / (top[:, None] / t).exp()
        torch.testing.assert_close(whole.double(), brute, rtol=1e-4, atol=0)
        metrics = knn_classify(train_x, train_y, test_x, test_y, 7, **opts)
        for chunk, train_chunk in [(1, 1), (7, 13), (25, 60), (4, 1000)]:
            part = knn_scores(train_x, train_y, test_x, 7, **opts, chunk=chunk, train_chunk=train_chunk)
            torch.testing.assert_close(part, whole, rtol=1e-5, atol=0)  # only the summation order differs
            blocks = {"chunk": chunk, "train_chunk": train_chunk}
            assert knn_classify(train_x, train_y, test_x, test_y, 7, **opts, **blocks) == metrics
    s, i = nearest(train_x, test_x, 3, chunk=4, train_chunk=7)
    assert s.shape == i.shape == (25, 3) and bool((s[:, :-1] >= s[:, 1:]).all())


def test_clusters_reach_100_percent_and_metric_keys():
    train_x, train_y = clusters(300, 8, 16, spread=0.2, seed=0)
    test_x, test_y = clusters(100, 8, 16, spread=0.2, seed=1)
    out = knn_classify(train_x, train_y, test_x, test_y, 8)
    assert out == {"knn_acc1": 1.0, "knn_acc5": 1.0, "knn_mean_per_class_recall": 1.0}
    out5 = knn_classify(train_x, train_y % 5, test_x, test_y % 5, 5, chunk=7)
    assert set(out5) == METRICS
    with pytest.raises(ConfigError, match="knn.temperature"):
        knn_classify(train_x, train_y, test_x, test_y, 8, temperature=0.0)
    with pytest.raises(ValueError, match=r"test_y values must lie in \[0, 4\)"):
        knn_classify(train_x, train_y % 4, test_x, test_y, 4)


def _ctx(train) -> EvalContext:
    return EvalContext(None, {}, None, None, Runtime.cpu(), 32, None, train)


def _knn(eset, train, options):
    return metric_dict(EVALUATORS.create("knn", "knn", **options)(eset, _ctx(train)))


def test_registered_evaluator():
    def eset(name, x, y):
        return EmbeddedSet(
            name,
            {"image": x, "points": torch.zeros(0, 16)},  # an empty modality is skipped
            torch.zeros(0, 16),
            torch.zeros(0, dtype=torch.long),
            {"digit": y, "half": (y >= 4).long()},
            {},
        )

    train_x, train_y = clusters(200, 8, 16, spread=0.2, seed=0)
    test_x, test_y = clusters(50, 8, 16, spread=0.2, seed=1)
    test, train = eset("toy", test_x, test_y), eset("toy-train", train_x, train_y)
    with torch.no_grad():
        out = _knn(test, train, {"k": 5, "shots": 3, "seed": 2})
    expected = {f"knn/image/digit/{m}" for m in METRICS | {"knn_acc5"}}
    expected |= {f"knn/image/half/{m}" for m in METRICS}  # 2 classes: max label + 1
    assert set(out) == expected
    assert out["knn/image/digit/knn_acc1"] == 1.0
    assert EVALUATORS.validate("knn", {"k": 3}).k == 3
    with pytest.raises(ValueError, match="'knn' fits on a training split, but dataset 'toy' has none"):
        _knn(test, None, {})
    with pytest.raises(ConfigError, match=r"knn.kk: unknown key .*valid keys: .*temperature"):
        _knn(test, train, {"kk": 3})
