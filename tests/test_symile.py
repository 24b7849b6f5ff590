"""Symile against a brute-force multilinear inner product and loss written with python loops, for both
negative modes and 3 and 4 modalities; known values; missing modalities; a few training steps."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from coalign.models.encoders.base import Tokens
from coalign.models.model import Features
from coalign.objectives.contrastive import info_nce
from coalign.objectives.symile import (
    Symile,
    draw_permutations,
    multilinear_inner_product,
    symile_loss,
)
from helpers import descend

MODS = ["image", "text", "audio", "points"]


def _embeddings(k, N, E=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        F.normalize(torch.randn(N, E, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
        for _ in range(k)
    ]


def _features(names, xs):
    return {m: Features(Tokens(x[:, None], None), x, x) for m, x in zip(names, xs, strict=True)}


def brute_mip(vectors):
    """sum_d prod_m v_m[d], one coordinate and one factor at a time."""
    total = 0.0
    for d in range(vectors[0].shape[0]):
        term = 1.0
        for v in vectors:
            term = term * v[d]
        total = total + term
    return total


def brute_symile(xs, scale, negatives, permutations=None):
    """mean over anchors m and rows i of -log softmax over the candidate tuples of the others.

    n_squared: every combination of the other modalities' rows is a candidate. n: candidate j is
    (o[perm_o[j]] for o) for j != i, and the sample's own tuple for j == i.
    """
    k, N = len(xs), xs[0].shape[0]
    total = 0.0
    for m in range(k):
        others = [x for o, x in enumerate(xs) if o != m]
        for i in range(N):
            if negatives == "n_squared":
                candidates = list(itertools.product(range(N), repeat=k - 1))
            else:
                perms = permutations[m]
                candidates = [(i,) * (k - 1) if j == i else tuple(int(p[j]) for p in perms) for j in range(N)]
            logits = torch.stack(
                [
                    scale * brute_mip([xs[m][i]] + [o[c] for o, c in zip(others, combo, strict=True)])
                    for combo in candidates
                ]
            )
            positive = scale * brute_mip([xs[m][i]] + [o[i] for o in others])
            total = total - (positive - torch.logsumexp(logits, 0))
    return total / (k * N)


def test_mip_matches_brute_force():
    xs = _embeddings(4, 5, E=6)
    got = multilinear_inner_product(*xs)
    for i in range(5):
        torch.testing.assert_close(got[i], brute_mip([x[i] for x in xs]))
    # Two vectors: the dot product.
    torch.testing.assert_close(multilinear_inner_product(xs[0], xs[1]), (xs[0] * xs[1]).sum(-1))


@pytest.mark.parametrize("k,N", [(3, 5), (4, 4)])
@pytest.mark.parametrize("negatives", ["n", "n_squared"])
def test_symile_loss_matches_brute_force_value_and_gradient(k, N, negatives):
    xs = _embeddings(k, N, seed=k)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    perms = draw_permutations(k, N, generator=torch.Generator().manual_seed(1)) if negatives == "n" else None
    fast = symile_loss(xs, scale, negatives, perms)
    slow = brute_symile(xs, scale, negatives, perms)
    torch.testing.assert_close(fast, slow)
    for got, want in zip(
        torch.autograd.grad(fast, [*xs, scale]), torch.autograd.grad(slow, [*xs, scale]), strict=True
    ):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


def test_known_values():
    xs = _embeddings(3, 5)
    zero = torch.tensor(0.0, dtype=torch.float64)
    # Scale 0: every candidate equally likely, loss = log(#candidates).
    assert math.isclose(symile_loss(xs, zero, "n").item(), math.log(5), rel_tol=1e-9)
    assert math.isclose(symile_loss(xs, zero, "n_squared").item(), math.log(25), rel_tol=1e-9)
    # Two modalities, all candidates: each anchor's term is one direction of CLIP's InfoNCE.
    a, b = _embeddings(2, 6, E=4, seed=3)
    s = torch.tensor(5.0, dtype=torch.float64)
    torch.testing.assert_close(symile_loss([a, b], s, "n_squared"), info_nce(a, b, s))
    # Three one-hot modalities, each sample on its own axis: positives MIP = 1, every negative 0.
    eye = torch.eye(4, dtype=torch.float64)
    big = torch.tensor(100.0, dtype=torch.float64)
    assert symile_loss([eye, eye, eye], big, "n_squared").item() < 1e-30
    # O(N): shifts by 1 and 2 never rebuild a positive tuple (a random draw could, by chance).
    shifts = [[torch.roll(torch.arange(4), -1), torch.roll(torch.arange(4), -2)]] * 3
    assert symile_loss([eye, eye, eye], big, "n", shifts).item() < 1e-30


def test_objective_draws_fresh_permutations_in_the_documented_order():
    xs = [x.detach() for x in _embeddings(3, 6, seed=4)]
    obj = Symile(modalities=MODS[:3], negatives="n")
    torch.manual_seed(123)
    got = obj(_features(MODS[:3], xs), {})["symile_loss"]
    torch.manual_seed(123)
    perms = draw_permutations(3, 6)
    torch.testing.assert_close(got, brute_symile(xs, obj.scale().detach().double(), "n", perms))


@pytest.mark.parametrize("negatives", ["n", "n_squared"])
def test_missing_modalities_use_rows_with_all_and_backward_works(negatives):
    full = [x.detach() for x in _embeddings(3, 7, seed=5)]
    present = {
        "audio": torch.tensor([1, 1, 1, 1, 0, 1, 1], dtype=torch.bool),
        "image": torch.tensor([1, 1, 1, 0, 1, 1, 1], dtype=torch.bool),
        "text": torch.tensor([1, 0, 1, 1, 1, 1, 1], dtype=torch.bool),
    }
    names = ["audio", "image", "text"]  # sorted: the order `modalities: None` binds them in
    leaves = [x[present[m]].clone().requires_grad_() for m, x in zip(names, full, strict=True)]
    obj = Symile(negatives=negatives)  # modalities: every one in the batch
    torch.manual_seed(7)
    out = obj(_features(names, leaves), {"present": present})
    every = present["image"] & present["text"] & present["audio"]
    torch.manual_seed(7)
    perms = draw_permutations(3, int(every.sum())) if negatives == "n" else None
    expected = brute_symile([x[every] for x in full], obj.scale().detach().double(), negatives, perms)
    torch.testing.assert_close(out["symile_loss"], expected)
    assert out["rows"].item() == every.sum().item() == 4
    out["symile_loss"].backward()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()
    # Sample 1 lacks text: its audio row (1) and image row (1) take no part.
    assert leaves[0].grad[1].abs().sum() == 0 and leaves[1].grad[1].abs().sum() == 0
    assert leaves[1].grad[0].abs().sum() > 0


def test_fewer_than_two_complete_rows_give_an_attached_zero():
    xs = _embeddings(3, 3, seed=6)
    present = {
        "image": torch.tensor([1, 1, 0], dtype=torch.bool),
        "text": torch.tensor([1, 0, 1], dtype=torch.bool),
        "audio": torch.tensor([1, 1, 1], dtype=torch.bool),
    }
    feats = _features(MODS[:3], [xs[0][:2], xs[1][:2], xs[2]])
    obj = Symile()
    out = obj(feats, {"present": present})
    assert out["symile_loss"].item() == 0.0 and out["rows"].item() == 1
    out["symile_loss"].backward()
    assert obj.logit_scale.grad.item() == 0.0
    # A named modality with no sample in the batch: no sample has them all.
    out = Symile(modalities=["image", "text", "points"])(feats, {"present": present})
    assert out["symile_loss"].item() == 0.0 and out["symile_loss"].requires_grad


@pytest.mark.parametrize("negatives", ["n", "n_squared"])
def test_a_few_steps_reduce_the_loss(negatives):
    torch.manual_seed(0)
    raw = [torch.nn.Parameter(torch.randn(8, 6)) for _ in range(3)]
    obj = Symile(negatives=negatives)

    def loss():
        torch.manual_seed(1)  # the same negatives at every evaluation, for a fair comparison
        return obj(_features(MODS[:3], [F.normalize(p, dim=-1) for p in raw]), {})["symile_loss"]

    first, last = descend(loss, [*raw, *obj.parameters()])
    assert last < 0.8 * first


@pytest.mark.parametrize("negatives", ["n", "n_squared"])
def test_autocast_does_not_lower_the_precision_of_the_logits(negatives):
    xs = [x.detach().float() for x in _embeddings(3, 6, E=32, seed=8)]
    perms = draw_permutations(3, 6, generator=torch.Generator().manual_seed(0))
    scale = torch.tensor(50.0)
    plain = symile_loss(xs, scale, negatives, perms)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = symile_loss(xs, scale, negatives, perms)
    torch.testing.assert_close(mixed, plain)
