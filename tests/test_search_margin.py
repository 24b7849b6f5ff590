"""The tuner's safety margin (coalign.search.holdout): a setting is accepted only when the lower 95 %
bound of its recall over the held-out queries reaches the target, not its mean."""

from __future__ import annotations

import re

import faiss
import numpy as np
import pytest

from coalign.registry import ConfigError
from coalign.search.holdout import PLATEAU, Holdout, Z, recall_bound, sweep
from coalign.search.tune import Candidate, table_lines, tune
from test_search_tune import blobs


def test_bound_is_mean_minus_z_standard_errors():
    r = np.array([1.0, 0.9, 0.8, 1.0, 1.0, 0.7, 1.0, 0.9])
    mean, bound = recall_bound(r)
    se = np.sqrt(((r - r.mean()) ** 2).sum() / (len(r) - 1)) / np.sqrt(len(r))
    assert mean == pytest.approx(0.9125) and bound == pytest.approx(0.9125 - 1.645 * se)
    assert recall_bound(np.ones(50)) == (1.0, 1.0)  # every query perfect: no margin needed


def test_holdout_recalls_per_query_match_exact_search():
    x = blobs(1200)
    hold = Holdout(x, 100, 10, seed=0)
    flat = faiss.IndexFlatIP(32)
    flat.add(x[hold.kept])
    ids = flat.search(hold.q, 10)[1]
    assert np.array_equal(hold.recalls(ids), np.ones(100))
    wrong = flat.search(hold.q, 40)[1][:, 30:]  # the 31st..40th best: none as good as the exact 10th
    ids = np.concatenate([ids[:, :6], wrong[:, :4]], axis=1)
    assert hold.recalls(ids) == pytest.approx(np.full(100, 0.6))


def test_tuned_choice_has_its_bound_over_the_target_and_reports_both():
    x = blobs(4000)
    _, report = tune(x, 0.9, queries=200, kinds=("flat", "ivf-flat", "ivf-sq8"))
    rows = {r["name"]: r for r in report["candidates"]}
    chosen = rows[report["type"]]
    assert chosen["recall_bound"] >= 0.9 and chosen["recall"] >= chosen["recall_bound"]
    assert report["recall_bound"] == chosen["recall_bound"] and report["recall_bound_z"] == Z
    assert report["recall@10"] == chosen["recall"]
    assert rows["flat"]["recall_bound"] == 1.0  # exact: every query perfect
    lines = table_lines(report)
    assert "bound" in lines[0]
    line = next(line for line in lines if line.strip().startswith(report["type"]))
    assert line.split()[4:6] == [f"{chosen['recall']:.4f}", f"{chosen['recall_bound']:.4f}"]


def test_a_target_the_mean_reaches_but_the_bound_does_not_is_refused_at_that_setting():
    x = blobs(4000)
    hold = Holdout(x, 200, 10, seed=0)
    ivf = faiss.index_factory(32, "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(x[hold.kept])
    ivf.add(x[hold.kept])
    probes = [1, 2, 4, 8, 16, 32, 64]
    stats = []
    for p in probes:
        ivf.nprobe = p
        stats.append(recall_bound(hold.recalls(ivf.search(hold.q, 10)[1])))
    # The first setting whose mean rises above its predecessor's while still short of perfect: a
    # target between its bound (and the cheaper setting's mean) and its mean.
    i = next(i for i in range(1, len(probes)) if stats[i][1] < stats[i][0] and stats[i][0] > stats[i - 1][0])
    mean, bound = stats[i]
    target = (max(bound, stats[i - 1][0]) + mean) / 2
    assert bound < target < mean
    cand = Candidate("ivf-flat", "IVF64,Flat", 0, axis="nprobe", values=probes)
    got = sweep(ivf, cand, hold, [target])[target]
    # The mean alone would accept nprobe=probes[i]; the bound sends the sweep to a costlier setting.
    assert got["status"] == "reaches target" and got["params"] != f"nprobe={probes[i]}"
    assert int(re.fullmatch(r"nprobe=(\d+)", got["params"]).group(1)) > probes[i]
    assert got["recall_bound"] >= target
    # A target over every bound but under the best mean is refused, naming the best bound.
    j = max(j for j in range(len(probes)) if stats[j][0] < 1)  # the costliest setting short of perfect
    top_mean, top_bound = stats[j]
    cand = Candidate("ivf-flat", "IVF64,Flat", 0, axis="nprobe", values=probes[: j + 1])
    assert top_bound < top_mean
    target = (top_bound + top_mean) / 2
    got = sweep(ivf, cand, hold, [target])[target]
    assert got["status"] == "below target"
    assert got["best_recall"] >= target > got["best_bound"]


def test_refusal_names_the_best_bound():
    x = blobs(1500)
    with pytest.raises(ConfigError) as err:
        tune(x, 0.999, queries=150, kinds=("ivf-pq",))
    m = re.search(
        r"best recall found is ([0-9.]+) \(ivf-pq, nprobe=\d+\), whose lower 95 % bound ([0-9.]+)",
        str(err.value),
    )
    assert m and float(m.group(2)) <= float(m.group(1)) < 0.999 + 1e-9


def test_one_sweep_for_several_targets_searches_each_setting_once_and_chooses_as_separate_sweeps(
    monkeypatch,
):
    import coalign.search.holdout as holdout

    x = blobs(4000)
    hold = Holdout(x, 200, 10, seed=0)
    ivf = faiss.index_factory(32, "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(x[hold.kept])
    ivf.add(x[hold.kept])
    cand = Candidate("ivf-flat", "IVF64,Flat", 0, axis="nprobe", values=[1, 2, 4, 8, 16, 32, 64])
    calls = {"search": 0, "timed": 0}
    bound, timing = holdout.recall_bound, holdout.latency_ms

    def counted_bound(r):
        calls["search"] += 1
        return bound(r)

    def counted_latency(*a, **kw):
        calls["timed"] += 1
        return timing(*a, **kw)

    monkeypatch.setattr(holdout, "recall_bound", counted_bound)
    monkeypatch.setattr(holdout, "latency_ms", counted_latency)
    targets = [0.5, 0.9, 0.99]
    both = sweep(ivf, cand, hold, targets)
    once = dict(calls)
    hardest = sweep(ivf, cand, hold, [0.99])[0.99]
    # The hardest target's walk alone searches as many settings as the walk for all three.
    assert calls["search"] - once["search"] == once["search"]
    assert once["timed"] == len({both[t]["params"] for t in targets})  # each chosen setting timed once
    for t in targets:
        alone = sweep(ivf, cand, hold, [t])[t]
        assert (both[t]["status"], both[t]["params"], both[t]["recall"]) == (
            alone["status"],
            alone["params"],
            alone["recall"],
        )
        assert both[t]["recall_bound"] >= t
    assert both[0.99]["params"] == hardest["params"]
    probes = [int(both[t]["params"].split("=")[1]) for t in targets]
    assert probes == sorted(probes) and probes[0] < probes[-1]  # the targets chose different settings


def test_a_sweep_that_stops_gaining_ends_before_the_costliest_settings(monkeypatch):
    x = blobs(4000)
    hold = Holdout(x, 200, 10, seed=0)
    ivf = faiss.index_factory(32, "IVF64,PQ2x4np", faiss.METRIC_INNER_PRODUCT)  # a crude code: capped
    ivf.train(x[hold.kept])
    ivf.add(x[hold.kept])
    probes = [1, 2, 4, 8, 16, 32, 64]
    cand = Candidate("ivf-pq", "IVF64,PQ2x4np", 0, axis="nprobe", values=probes)
    recalls = []
    for p in probes:
        ivf.nprobe = p
        recalls.append(recall_bound(hold.recalls(ivf.search(hold.q, 10)[1]))[0])
    # where the walk must stop: the first doubling that gains less than PLATEAU
    stop = next(i for i in range(1, len(probes)) if recalls[i] - recalls[i - 1] < PLATEAU)
    assert stop < len(probes) - 1 and max(recalls) < 0.9
    searched = []
    real = Holdout.recalls

    def counted(self, ids):
        searched.append(1)
        return real(self, ids)

    monkeypatch.setattr(Holdout, "recalls", counted)
    got = sweep(ivf, cand, hold, [0.9])[0.9]
    assert got["status"] == "below target" and got["plateau"] is True
    assert len(searched) == stop + 1  # settings past the plateau are never searched
    assert got["best_recall"] == pytest.approx(max(recalls[: stop + 1]), abs=1e-4)
