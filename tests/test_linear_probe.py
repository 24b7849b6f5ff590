"""Linear probe: few-shot sampling, stratified split, the L-BFGS fit against scikit-learn, the weight
decay sweep, and the registered evaluator on a hand-built EmbeddedSet."""

from __future__ import annotations

import pytest
import torch
from sklearn.linear_model import LogisticRegression

from coalign.data.sources.base import ZeroShotTask
from coalign.evaluate.base import EvalContext, metric_dict
from coalign.evaluate.embed import EmbeddedSet
from coalign.evaluate.linear_probe import (
    LinearProbeOptions,
    fit_logistic,
    linear_probe,
    sample_shots,
    stratified_split,
    sweep_weight_decay,
    weight_decay_grid,
)
from coalign.registry import EVALUATORS, ConfigError
from coalign.runtime import Runtime

METRICS = {"lp_acc1", "lp_mean_per_class_recall", "lp_weight_decay"}


@pytest.fixture(autouse=True)
def _one_thread():
    """The fits here are tiny (hundreds of rows): a second OpenMP thread buys nothing, and on a loaded
    machine every parallel op can wait a scheduler timeslice for it (measured: 50x slower)."""
    torch.set_num_threads(1)


def clusters(n: int, classes: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters around fixed class centres (the same centres for every seed)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234))  # (C, D)
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    y = y[torch.randperm(n, generator=gen)]
    return centres[y] + spread * torch.randn(n, dim, generator=gen), y


def test_sample_shots_exact_k_per_class_and_seeded():
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 2, 2])  # counts 4, 3, 5
    idx = sample_shots(y, 3, seed=5)
    assert torch.equal(idx, idx.sort().values) and len(idx.unique()) == len(idx)
    assert torch.bincount(y[idx], minlength=3).tolist() == [3, 3, 3]
    assert torch.equal(idx, sample_shots(y, 3, seed=5))
    draws = {tuple(sample_shots(y, 2, seed=s).tolist()) for s in range(10)}
    assert len(draws) > 1  # the seed changes which samples are shots
    assert torch.equal(idx[y[idx] == 1], torch.tensor([1, 4, 7]))  # class 1 has exactly 3: all of them


def test_sample_shots_names_the_short_classes():
    y = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3])
    with pytest.raises(ValueError, match=r"3-shot .* too few in class 1: 1, class 2: 2$"):
        sample_shots(y, 3)
    with pytest.raises(ValueError, match="shots must be >= 1"):
        sample_shots(y, 0)


def test_stratified_split():
    y = torch.tensor([0] * 10 + [1] * 5 + [2] * 1 + [3] * 2)
    fit, val = stratified_split(y, 0.2, seed=3)
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(len(y)))
    # round(0.2 * n) clamped to [1, n - 1]: 2, 1, 0 (a lone sample stays in training), 1
    assert torch.bincount(y[val], minlength=4).tolist() == [2, 1, 0, 1]
    assert torch.equal(val, stratified_split(y, 0.2, seed=3)[1])
    _, val1 = stratified_split(torch.arange(5), 0.5)  # one sample per class: nothing to validate on
    assert len(val1) == 0


def test_fit_matches_sklearn():
    # mean CE + wd/2 ||W||^2 is sklearn's 1/2 ||W||^2 + C * sum CE with C = 1 / (n * wd).
    x, y = clusters(240, 4, 8, spread=2.0, seed=0)
    wd = 1e-2
    w, b = fit_logistic(x, y, 4, wd, max_iter=500, tol=1e-9)
    ref = LogisticRegression(C=1 / (len(x) * wd), tol=1e-10, max_iter=5000).fit(x.double().numpy(), y.numpy())
    ours = torch.addmm(b, x, w.T).softmax(dim=1).double()
    theirs = torch.from_numpy(ref.predict_proba(x.double().numpy()))
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)


def test_separable_clusters_reach_100_percent():
    train_x, train_y = clusters(200, 5, 32, spread=0.3, seed=0)
    test_x, test_y = clusters(100, 5, 32, spread=0.3, seed=1)
    out = linear_probe(train_x, train_y, test_x, test_y, 5)
    assert set(out) == METRICS  # no acc5 with 5 classes
    assert out["lp_acc1"] == 1.0 and out["lp_mean_per_class_recall"] == 1.0
    assert 1e-6 <= out["lp_weight_decay"] <= 1e2
    assert out["lp_weight_decay"] in weight_decay_grid(LinearProbeOptions())


def test_noisy_beats_chance_and_is_deterministic():
    train_x, train_y = clusters(400, 10, 16, spread=2.5, seed=0)
    test_x, test_y = clusters(300, 10, 16, spread=2.5, seed=1)
    out = linear_probe(train_x, train_y, test_x, test_y, 10, seed=7)
    assert set(out) == METRICS | {"lp_acc5"}
    assert 0.3 < out["lp_acc1"] < 1.0  # chance is 0.1
    assert out["lp_acc5"] >= out["lp_acc1"]
    assert out == linear_probe(train_x, train_y, test_x, test_y, 10, seed=7)
    few = linear_probe(train_x, train_y, test_x, test_y, 10, shots=8, seed=7)
    assert few == linear_probe(train_x, train_y, test_x, test_y, 10, shots=8, seed=7)
    assert few["lp_acc1"] > 0.2


def test_sweep_shape_and_choice():
    """CLIP_benchmark's search on a 9-point grid with 3 coarse points: coarse {0, 4, 8}, then steps 2, 1
    around the peak; the chosen value is the most accurate tried (largest on ties)."""
    train_x, train_y = clusters(200, 5, 16, spread=2.0, seed=0)
    val_x, val_y = clusters(100, 5, 16, spread=2.0, seed=1)
    opts = LinearProbeOptions(wd_min=1e-4, wd_max=1e4, wd_steps=9, wd_coarse=3)
    grid = weight_decay_grid(opts)
    assert grid == pytest.approx([10.0**e for e in range(-4, 5)])
    wd, (w, b), tried = sweep_weight_decay(train_x, train_y, val_x, val_y, 5, opts)
    idx = {round(torch.tensor(v).log10().item()) + 4: a for v, a in tried.items()}
    assert {0, 4, 8} <= set(idx)
    coarse_peak = max([0, 4, 8], key=lambda i: (idx[i], i))
    assert {max(coarse_peak - 2, 0), min(coarse_peak + 2, 8)} <= set(idx)
    assert len(idx) <= 3 + 2 + 2
    best = max(tried.values())
    assert tried[wd] == best and wd == max(v for v, a in tried.items() if a == best)
    assert w.shape == (5, 16) and b.shape == (5,)


def test_one_shot_skips_the_sweep():
    train_x, train_y = clusters(50, 5, 8, spread=0.3, seed=0)
    test_x, test_y = clusters(50, 5, 8, spread=0.3, seed=1)
    out = linear_probe(train_x, train_y, test_x, test_y, 5, shots=1, default_weight_decay=0.05)
    assert out["lp_weight_decay"] == 0.05
    assert out["lp_acc1"] > 0.9  # one example per far-apart cluster is enough
    out2 = linear_probe(train_x, train_y, test_x, test_y, 5, shots=2)
    assert out2["lp_weight_decay"] in weight_decay_grid(LinearProbeOptions())


def test_bad_inputs_fail_clearly():
    x, y = clusters(20, 2, 4, spread=0.1, seed=0)
    with pytest.raises(ConfigError, match=r"linear_probe.wd_mni: unknown key \(did you mean 'wd_min'\?\)"):
        linear_probe(x, y, x, y, 2, wd_mni=1e-3)
    with pytest.raises(ConfigError, match="wd_min .* must not exceed wd_max"):
        linear_probe(x, y, x, y, 2, wd_min=1.0, wd_max=0.1)
    with pytest.raises(ValueError, match=r"train_y values must lie in \[0, 1\)"):
        linear_probe(x, y, x, y, 1)
    with pytest.raises(ValueError, match="test_x has D=3"):
        linear_probe(x, y, x[:, :3], y, 2)


def _sets(tasks: dict) -> tuple[EmbeddedSet, EmbeddedSet]:
    def eset(name, x, y):
        return EmbeddedSet(
            name,
            {"image": x, "audio": torch.zeros(0, x.shape[1])},  # an empty modality is skipped
            torch.zeros(0, x.shape[1]),
            torch.zeros(0, dtype=torch.long),
            {"digit": y, "parity": y % 2},
            tasks,
        )

    train_x, train_y = clusters(60, 3, 8, spread=0.3, seed=0)
    test_x, test_y = clusters(30, 3, 8, spread=0.3, seed=1)
    test, train = eset("toy", test_x, test_y), eset("toy-train", train_x, train_y)
    train.labels["only_train"] = train_y
    return test, train


def _ctx(train) -> EvalContext:
    return EvalContext(None, {}, None, None, Runtime.cpu(), 32, None, train)


def _probe(eset, train, options):
    return metric_dict(EVALUATORS.create("linear_probe", "linear_probe", **options)(eset, _ctx(train)))


def test_registered_evaluator():
    tasks = {"digit": ZeroShotTask("digit", [f"d{i}" for i in range(10)], ["a {}"])}
    test, train = _sets(tasks)
    with torch.no_grad():  # as the suite runs evaluators
        out = _probe(test, train, {"shots": 5, "seed": 1, "max_iter": 50})
    # digit: 10 classes from its task, so acc5 is reported; parity: max label + 1 = 2 classes.
    expected = {f"linear_probe/image/digit/{m}" for m in METRICS | {"lp_acc5"}}
    expected |= {f"linear_probe/image/parity/{m}" for m in METRICS}
    assert set(out) == expected
    assert out["linear_probe/image/digit/lp_acc1"] == 1.0
    assert EVALUATORS.validate("linear_probe", {"shots": 4}).shots == 4
    with pytest.raises(ValueError, match="'linear_probe' fits on a training split, but dataset 'toy'"):
        _probe(test, None, {})
    with pytest.raises(ConfigError, match=r"linear_probe.shot: unknown key .*valid keys: .*shots"):
        _probe(test, train, {"shot": 4})
    with pytest.raises(ValueError, match="too few in class 0: 20, class 1: 20, class 2: 20"):
        _probe(test, train, {"shots": 21})


def test_evaluator_rejects_labels_beyond_the_task():
    test, train = _sets({"digit": ZeroShotTask("digit", ["zero", "one"], ["a {}"])})
    with pytest.raises(ValueError, match="label 'digit' reaches 2, but its task names only 2 classes"):
        _probe(test, train, {})
