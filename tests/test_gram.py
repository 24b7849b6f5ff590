"""GRAM against a per-tuple determinant formula (explicit A A^T and torch.linalg.det, in loops), in
value and gradient, for 3 and 4 modalities; known volumes; missing modalities; a few training steps."""

import math

import pytest
import torch
import torch.nn.functional as F

from coalign.models.encoders.base import Tokens
from coalign.models.model import Features
from coalign.objectives.gram import GRAM, gram_loss, gram_volume
from helpers import descend

MODS = ["text", "image", "audio", "points"]


def _embeddings(k, N, E=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [F.normalize(torch.randn(N, E, generator=g, dtype=torch.float64), dim=-1) for _ in range(k)]
    return [x.requires_grad_() for x in xs]


def _features(names, xs):
    return {m: Features(Tokens(x[:, None], None), x, x) for m, x in zip(names, xs, strict=True)}


def brute_volume(vectors, eps):
    """sqrt(|det(A A^T)| + eps) with the vectors as the rows of A."""
    a = torch.stack(vectors)  # (k, E)
    return torch.sqrt(torch.linalg.det(a @ a.T).abs() + eps)


def brute_gram(anchor, others, scale, label_smoothing, eps):
    """1/2 (anchor->tuple + tuple->anchor) smoothed cross-entropies of logits -scale * volume, by loops.

    Smoothed CE of a row: -(1 - ls) log p_target - ls / N sum_j log p_j.
    """
    N = anchor.shape[0]
    logits = torch.stack(
        [
            torch.stack([-scale * brute_volume([anchor[i], *[o[j] for o in others]], eps) for j in range(N)])
            for i in range(N)
        ]
    )  # [i, j]: anchor i with the tuple of sample j
    total = 0.0
    for rows in (logits, logits.T):
        for i in range(N):
            logp = rows[i] - torch.logsumexp(rows[i], 0)
            total = total - (1 - label_smoothing) * logp[i] - label_smoothing * logp.mean()
    return total / (2 * N)


def test_known_volumes():
    e = torch.eye(4, dtype=torch.float64)
    # Orthonormal vectors span a unit cube; identical vectors span nothing.
    torch.testing.assert_close(
        gram_volume(e[:1], [e[1:2], e[2:3]], eps=0.0), torch.ones(1, 1, dtype=torch.float64)
    )
    torch.testing.assert_close(
        gram_volume(e[:1], [e[:1], e[:1]], eps=0.0), torch.zeros(1, 1, dtype=torch.float64)
    )
    # Two vectors: |sin| of the angle between them.
    theta = 0.3
    v = torch.tensor([[math.cos(theta), math.sin(theta), 0.0, 0.0]], dtype=torch.float64)
    assert math.isclose(gram_volume(e[:1], [v], eps=0.0).item(), math.sin(theta), rel_tol=1e-12)
    # (N_a, N_t): anchor i against the tuple of sample j.
    xs = _embeddings(3, 4)
    vol = gram_volume(xs[0], xs[1:], eps=1e-8)
    assert vol.shape == (4, 4)
    torch.testing.assert_close(vol[2, 1], brute_volume([xs[0][2], xs[1][1], xs[2][1]], 1e-8))


@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_gram_loss_matches_per_tuple_determinants_value_and_gradient(k, label_smoothing):
    xs = _embeddings(k, 5, seed=k)
    scale = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    fast = gram_loss(xs[0], xs[1:], scale, label_smoothing, eps=1e-8)
    slow = brute_gram(xs[0], xs[1:], scale, label_smoothing, eps=1e-8)
    torch.testing.assert_close(fast, slow)
    leaves = [*xs, scale]
    for got, want in zip(torch.autograd.grad(fast, leaves), torch.autograd.grad(slow, leaves), strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


def test_gradient_is_finite_for_an_exactly_aligned_tuple():
    xs = [x.detach().clone() for x in _embeddings(3, 4, seed=1)]
    xs[1][0] = xs[0][0]  # sample 0's three embeddings coincide: volume 0
    xs[2][0] = xs[0][0]
    xs = [x.requires_grad_() for x in xs]
    loss = gram_loss(xs[0], xs[1:], torch.tensor(10.0, dtype=torch.float64))
    for g in torch.autograd.grad(loss, xs):
        assert torch.isfinite(g).all()


def test_objective_anchors_on_the_configured_modality():
    xs = [x.detach() for x in _embeddings(3, 5, seed=2)]
    feats = _features(["text", "image", "audio"], xs)
    obj = GRAM(anchor="image", modalities=["text", "image", "audio"])
    out = obj(feats, {})
    expected = brute_gram(xs[1], [xs[0], xs[2]], obj.scale().detach().double(), 0.1, 1e-8)
    torch.testing.assert_close(out["gram_loss"], expected)
    # Default: text anchors, every modality of the batch (sorted) forms the tuple.
    out = GRAM()(feats, {})
    expected = brute_gram(xs[0], [xs[2], xs[1]], obj.scale().detach().double(), 0.1, 1e-8)  # audio, image
    torch.testing.assert_close(out["gram_loss"], expected)


def test_missing_modalities_use_rows_with_all_and_backward_works():
    names = ["text", "image", "audio"]
    full = [x.detach() for x in _embeddings(3, 7, seed=3)]
    present = {
        "text": torch.tensor([1, 1, 1, 0, 1, 1, 1], dtype=torch.bool),
        "image": torch.tensor([1, 0, 1, 1, 1, 1, 1], dtype=torch.bool),
        "audio": torch.tensor([1, 1, 1, 1, 0, 1, 1], dtype=torch.bool),
    }
    leaves = [x[present[m]].clone().requires_grad_() for m, x in zip(names, full, strict=True)]
    obj = GRAM(anchor="text", modalities=names)
    out = obj(_features(names, leaves), {"present": present})
    every = present["text"] & present["image"] & present["audio"]
    expected = brute_gram(
        full[0][every], [full[1][every], full[2][every]], obj.scale().detach().double(), 0.1, 1e-8
    )
    torch.testing.assert_close(out["gram_loss"], expected)
    assert out["rows"].item() == 4
    out["gram_loss"].backward()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()
    # Sample 1 lacks image: its text row (1) takes no part; sample 0's does.
    assert leaves[0].grad[1].abs().sum() == 0 and leaves[0].grad[0].abs().sum() > 0


def test_no_complete_tuple_gives_an_attached_zero():
    xs = _embeddings(3, 3, seed=4)
    present = {
        "text": torch.tensor([1, 1, 0], dtype=torch.bool),
        "image": torch.tensor([0, 1, 1], dtype=torch.bool),
        "audio": torch.tensor([1, 1, 1], dtype=torch.bool),
    }
    feats = _features(["text", "image", "audio"], [xs[0][:2], xs[1][1:], xs[2]])
    obj = GRAM()
    out = obj(feats, {"present": present})
    assert out["gram_loss"].item() == 0.0 and out["rows"].item() == 1
    out["gram_loss"].backward()
    assert obj.logit_scale.grad.item() == 0.0
    # No anchor in the batch.
    out = GRAM(anchor="points")(feats, {"present": present})
    assert out["gram_loss"].item() == 0.0 and out["gram_loss"].requires_grad


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    raw = [torch.nn.Parameter(torch.randn(8, 6)) for _ in range(3)]
    obj = GRAM(label_smoothing=0.0)

    def loss():
        return obj(_features(MODS[:3], [F.normalize(p, dim=-1) for p in raw]), {})["gram_loss"]

    first, last = descend(loss, [*raw, *obj.parameters()])
    assert last < 0.5 * first


def test_autocast_does_not_lower_the_precision_of_the_volumes():
    xs = [x.detach().float() for x in _embeddings(3, 6, E=32, seed=5)]
    scale = torch.tensor(20.0)
    plain = gram_loss(xs[0], xs[1:], scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = gram_loss(xs[0], xs[1:], scale)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain)
