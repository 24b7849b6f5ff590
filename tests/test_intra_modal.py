"""NT-Xent (SLIP's SimCLR term, TCL's text term) against a brute-force evaluation, and the objective."""

import math

import pytest
import torch
import torch.nn.functional as F

from coalign.models.encoders.base import Tokens
from coalign.models.model import Features, MultimodalModel
from coalign.objectives.intra_modal import SimCLR, TCLText, nt_xent
from coalign.objectives.task import Task
from coalign.registry import ENCODERS, OBJECTIVES, ConfigError


def brute_force_nt_xent(z1, z2, t):
    """L = 1/2B sum_a -log e^{s(a,p(a))/t} / sum_{k != a} e^{s(a,k)/t} over the 2B views a, where p(a) is
    the other view of a's sample and s is cosine similarity."""
    B = z1.shape[0]
    views = [F.normalize(v, dim=0) for v in [*z1, *z2]]  # view a < B is z1[a], view a >= B is z2[a - B]
    total = 0.0
    for a in range(2 * B):
        positive = (a + B) % (2 * B)
        others = torch.stack([(views[a] * views[k]).sum() / t for k in range(2 * B) if k != a])
        total = total - ((views[a] * views[positive]).sum() / t - torch.log(torch.exp(others).sum()))
    return total / (2 * B)


def _views(B=6, E=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(B, E, generator=g, dtype=torch.float64).requires_grad_()
    z2 = torch.randn(B, E, generator=g, dtype=torch.float64).requires_grad_()
    return z1, z2


@pytest.mark.parametrize("B", [1, 2, 6])
def test_nt_xent_matches_brute_force_value_and_gradient(B):
    z1, z2 = _views(B)  # not normalised: nt_xent normalises, so the gradient goes through that too
    fast = nt_xent(z1, z2, 0.1)
    g1, g2 = torch.autograd.grad(fast, (z1, z2))
    slow = brute_force_nt_xent(z1, z2, 0.1)
    s1, s2 = torch.autograd.grad(slow, (z1, z2))
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(g1, s1)
    torch.testing.assert_close(g2, s2)


def test_nt_xent_known_values():
    B = 4
    eye = torch.eye(B, 8)  # orthonormal samples, identical views: positives 1, negatives 0
    assert nt_xent(eye, eye.clone(), 0.01).item() < 1e-6
    # Every view equal: each anchor has 2B - 1 equally likely candidates, self excluded.
    same = torch.ones(B, 8)
    assert math.isclose(nt_xent(same, same, 0.1).item(), math.log(2 * B - 1), rel_tol=1e-6)
    # The views are scaled before normalisation: scale does not change the loss.
    z1, z2 = _views(B)
    torch.testing.assert_close(nt_xent(3 * z1, 0.5 * z2, 0.1), nt_xent(z1, z2, 0.1))


def _tiny_model(width=24):
    image = ENCODERS.create("vit", image_size=16, patch_size=8, width=width, depth=1, heads=2)
    text = ENCODERS.create("text_transformer", vocab_size=20, context_length=6, width=16, depth=1, heads=2)
    heads = {"image": torch.nn.Linear(width, 8, bias=False), "text": torch.nn.Linear(16, 8, bias=False)}
    return MultimodalModel({"image": image, "text": text}, heads, embed_dim=8)


def _batch(B=3):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, 16, 16, generator=g)
    ids = torch.randint(3, 20, (B, 6), generator=g)
    return {
        "image": images,
        "image@v1": images + 0.1 * torch.randn(B, 3, 16, 16, generator=g),
        "image@v2": images.flip(-1),
        "text": ids,
        "text@v1": ids,
        "text@v2": ids.roll(1, dims=1),
    }


def test_simclr_builds_its_head_from_the_tower_width_and_trains_it():
    model = _tiny_model(width=24)
    obj = OBJECTIVES.create("simclr", head_hidden=32, head_dim=12)
    obj.bind(model)
    assert obj.head[0].in_features == 24 and obj.head[-1].out_features == 12
    task = Task(model, [obj], [1.0])
    out = task(_batch())
    assert set(out) == {"loss", "simclr_loss", "simclr/accuracy"}
    out["loss"].backward()
    assert obj.head[0].weight.grad.abs().sum() > 0
    tower_grads = [p.grad for p in model.towers["image"].parameters() if p.grad is not None]
    assert tower_grads and sum(g.abs().sum() for g in tower_grads) > 0  # the term trains the tower too
    # The loss is NT-Xent of the head's outputs for the two views.
    features = model(_batch())
    z = obj.head(torch.cat([features["image@v1"].pooled, features["image@v2"].pooled]))
    torch.testing.assert_close(obj(features, {})["simclr_loss"], nt_xent(*z.chunk(2), 0.1))


def test_tcl_text_uses_the_shared_embedding_and_its_own_loss_name():
    model = _tiny_model()
    obj = OBJECTIVES.create("tcl_text")
    obj.bind(model)
    assert isinstance(obj, TCLText) and obj.head is None and not list(obj.parameters())
    features = model(_batch())
    out = obj(features, {})
    expected = nt_xent(features["text@v1"].embedding, features["text@v2"].embedding, 0.07)
    torch.testing.assert_close(out["tcl_text_loss"], expected)
    # Two instances with different loss names coexist in one task.
    simclr = SimCLR(head_hidden=16, head_dim=8)
    simclr.bind(model)
    keys = set(Task(model, [simclr, obj], [1.0, 0.5])(_batch()))
    assert {"simclr_loss", "tcl_text_loss", "simclr/accuracy", "tcl_text/accuracy"} <= keys


def test_rows_are_aligned_by_presence():
    e = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1)
    present = {"text@v1": torch.tensor([1, 1, 0, 1, 1], dtype=torch.bool)}
    present["text@v2"] = torch.tensor([1, 0, 1, 1, 1], dtype=torch.bool)
    feats = {k: Features(Tokens(e[m][:, None], None), e[m], e[m]) for k, m in present.items()}
    out = TCLText()(feats, {"present": present})
    both = torch.tensor([1, 0, 0, 1, 1], dtype=torch.bool)
    torch.testing.assert_close(out["tcl_text_loss"], nt_xent(e[both], e[both], 0.07))


def test_missing_views_and_bad_configs_fail_clearly():
    model = _tiny_model()
    obj = SimCLR(head_hidden=16, head_dim=8)
    obj.bind(model)
    batch = {"image": _batch()["image"]}
    with pytest.raises(ConfigError, match=r"needs views \['image@v1', 'image@v2'\].*data.transforms"):
        obj(model(batch), batch)
    with pytest.raises(RuntimeError, match="bind"):
        SimCLR()(model(_batch()), {})
    with pytest.raises(ConfigError, match="audio"):
        SimCLR(views=("audio@v1", "audio@v2")).bind(model)
    with pytest.raises(ConfigError, match=r"objectives\.0\.views.*one modality"):
        OBJECTIVES.create("simclr", where="objectives.0", views=("image@v1", "text@v1"))
    with pytest.raises(ConfigError, match="different"):
        OBJECTIVES.create("simclr", views=("image@v1", "image@v1"))
    with pytest.raises(ConfigError, match="temperature"):
        OBJECTIVES.create("simclr", temperature=0.0)
    with pytest.raises(ConfigError, match="did you mean 'head_dim'"):
        OBJECTIVES.create("simclr", head_dims=8)


def test_batches_with_one_or_no_shared_sample_do_not_break_the_step():
    obj = SimCLR(views=("text@v1", "text@v2"), head_hidden=8, head_dim=4)
    obj.bind(_tiny_model())
    x = torch.randn(3, 16, requires_grad=True)

    def run(mask1, mask2):
        present = {"text@v1": torch.tensor(mask1, dtype=torch.bool)}
        present["text@v2"] = torch.tensor(mask2, dtype=torch.bool)
        feats = {k: Features(Tokens(x[m][:, None], None), x[m], x[m]) for k, m in present.items()}
        loss = obj(feats, {"present": present})["simclr_loss"]
        loss.backward()  # BatchNorm in the head must not fail on a single shared sample
        return loss

    assert run([1, 1, 0], [0, 1, 1]).item() == 0.0  # one sample: its only candidate is its positive
    assert run([1, 0, 0], [0, 0, 1]).item() == 0.0  # no shared sample: a zero that still backpropagates
