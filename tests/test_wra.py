"""Word-region alignment (issue #16.5): IPOT against brute-force exact optimal transport (every
permutation; a linear program for unequal sizes), padding, and the objective on a UNITER model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from coalign.config import ObjectiveSpec
from coalign.objectives.task import Task
from coalign.objectives.wra import ipot, uniform_mass, wra_distance
from parts import tiny_batch, tiny_fusion, tiny_model, transforms_for, world


def exact_ot(cost: np.ndarray, mu: np.ndarray, nu: np.ndarray) -> float:
    """min <T, C> over T >= 0 with row sums mu and column sums nu, as a linear program."""
    n, m = cost.shape
    rows = np.kron(np.eye(n), np.ones((1, m)))  # sum_j T_ij = mu_i
    cols = np.kron(np.ones((1, n)), np.eye(m))  # sum_i T_ij = nu_j
    res = linprog(cost.ravel(), A_eq=np.vstack([rows, cols]), b_eq=np.concatenate([mu, nu]), bounds=(0, None))
    assert res.success
    return float(res.fun)


def test_ipot_reaches_the_exact_ot_of_every_permutation():
    """n = m with uniform mass: the optimal plan is a permutation (Birkhoff), so brute force over
    all 4! assignments gives the exact distance."""
    torch.manual_seed(0)
    cost = torch.rand(3, 4, 4) * 2  # three problems
    mass = torch.full((3, 4), 0.25)
    T = ipot(cost, mass, mass, beta=0.5, iterations=300)
    for c, t in zip(cost, T, strict=True):
        brute = min(sum(float(c[i, p[i]]) for i in range(4)) / 4 for p in itertools.permutations(range(4)))
        assert float((t * c).sum()) == pytest.approx(brute, abs=1e-4)
        torch.testing.assert_close(t.sum(1), torch.full((4,), 0.25), atol=1e-5, rtol=0)
        torch.testing.assert_close(t.sum(0), torch.full((4,), 0.25), atol=1e-5, rtol=0)


def test_ipot_with_unequal_sizes_and_padding_equals_a_linear_program():
    torch.manual_seed(1)
    cost = torch.rand(1, 4, 6) * 2
    word_mask = torch.tensor([[True, True, True, False]])  # the last word is padding
    region_mask = torch.tensor([[True, True, False, True, True, True]])
    mu, nu = uniform_mass(word_mask), uniform_mass(region_mask)
    T = ipot(cost, mu, nu, beta=0.5, iterations=500)
    assert float(T[0, 3].abs().sum()) == 0 and float(T[0, :, 2].abs().sum()) == 0, "padding has no mass"
    expected = exact_ot(cost[0].numpy().astype(np.float64), mu[0].numpy(), nu[0].numpy())
    assert float((T * cost).sum()) == pytest.approx(expected, abs=1e-4)


def test_wra_distance_ignores_padded_tokens_and_their_values():
    torch.manual_seed(2)
    w, r = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    wm = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    rm = torch.ones(2, 4, dtype=torch.bool)
    base = wra_distance(w, r, wm, rm)
    w2 = w.clone()
    w2[0, 3:] = 100.0  # new values at padded positions
    torch.testing.assert_close(wra_distance(w2, r, wm, rm), base)
    short = wra_distance(w[:1, :3], r[:1], wm[:1, :3], rm[:1])  # the padding cut off
    torch.testing.assert_close(short, base[:1], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    source = world(["image", "text"])
    transforms = transforms_for(["image", "text"], source, tmp_path_factory.mktemp("wra"))
    return transforms, tiny_batch(source, transforms, size=6, missing="image")


@pytest.mark.parametrize("fusion", ["single", "cross"])
def test_wra_objective_trains_the_fusion_part(setup, fusion):
    transforms, batch = setup
    torch.manual_seed(0)
    model = tiny_model(transforms, fusion=tiny_fusion("image", "text", fusion))
    task = Task.from_specs(model, [ObjectiveSpec(name="itm"), ObjectiveSpec(name="wra")], transforms)
    out = task(batch)
    assert 0 < out["wra_loss"].item() < 2  # a mean of cosine distances in [0, 2]
    out["wra_loss"].backward()
    layers = model.fusion.transformer if fusion == "single" else model.fusion.blocks
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layers.parameters())
    assert model.fusion.proj_context.weight.grad.abs().sum() > 0, "the image side moves too"
