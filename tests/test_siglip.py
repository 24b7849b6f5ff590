"""SigLIP: plain and chunked loss against a brute-force double loop, in value and gradient; the objective."""

import math

import pytest
import torch
import torch.nn.functional as F

from coalign.models.encoders.base import Tokens
from coalign.models.model import Features
from coalign.objectives.siglip import SigLIP, chunked_siglip_loss, siglip_loss
from coalign.objectives.task import Task
from coalign.registry import OBJECTIVES, ConfigError


def brute_force_siglip(a, b, scale, bias):
    """L = -(1/B) sum_{i,j} log sigmoid(z_ij (scale a_i.b_j + bias)), z_ij = +1 if i == j else -1."""
    B = a.shape[0]
    total = 0.0
    for i in range(B):
        for j in range(B):
            z = 1.0 if i == j else -1.0
            total = total - torch.log(torch.sigmoid(z * (scale * (a[i] * b[j]).sum() + bias)))
    return total / B


def _inputs(B=7, E=5, seed=0, scale=10.0, bias=-10.0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(B, E, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    # b is correlated with a so that positives and negatives both carry real gradient.
    b = F.normalize(a.detach() + 0.7 * torch.randn(B, E, generator=g, dtype=torch.float64), dim=-1)
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    return a, b.requires_grad_(), s, t


def _value_and_grads(fn, a, b, s, t):
    loss = fn(a, b, s, t)
    return (loss, *torch.autograd.grad(loss, (a, b, s, t)))


@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (3.0, 0.5)])
def test_siglip_loss_matches_brute_force_value_and_gradient(scale, bias):
    inputs = _inputs(scale=scale, bias=bias)
    expected = _value_and_grads(brute_force_siglip, *inputs)
    for got, want in zip(_value_and_grads(siglip_loss, *inputs), expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 7, 100])  # 2, 3 and 4 leave a short last block of B = 7
def test_chunked_siglip_matches_brute_force_value_and_gradient(chunk):
    inputs = _inputs(scale=3.0, bias=0.5)
    expected = _value_and_grads(brute_force_siglip, *inputs)
    got = _value_and_grads(lambda *x: chunked_siglip_loss(*x, chunk=chunk), *inputs)
    for g, w in zip(got, expected, strict=True):
        torch.testing.assert_close(g, w)


def test_chunked_matches_plain_at_a_realistic_size_in_float32():
    g = torch.Generator().manual_seed(1)
    a = F.normalize(torch.randn(96, 32, generator=g), dim=-1).requires_grad_()
    b = F.normalize(a.detach() + torch.randn(96, 32, generator=g), dim=-1).requires_grad_()
    s, t = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    plain = _value_and_grads(siglip_loss, a, b, s, t)
    chunked = _value_and_grads(lambda *x: chunked_siglip_loss(*x, chunk=40), a, b, s, t)
    for c, p in zip(chunked, plain, strict=True):
        torch.testing.assert_close(c, p, rtol=1e-5, atol=1e-6)


def test_autocast_keeps_the_elementwise_maths_in_float32():
    g = torch.Generator().manual_seed(2)
    a = F.normalize(torch.randn(64, 32, generator=g), dim=-1)
    b = F.normalize(a + torch.randn(64, 32, generator=g), dim=-1)
    s, t = torch.tensor(10.0), torch.tensor(-10.0)
    exact = siglip_loss(a, b, s, t)
    with torch.autocast("cpu", torch.bfloat16):
        losses = [siglip_loss(a, b, s, t), chunked_siglip_loss(a.requires_grad_(), b, s, t, 20)]
    for loss in losses:
        assert loss.dtype == torch.float32
        # Only the bf16 matmul rounds (~6e-5 relative here); bf16 bias, softplus and sum are 3e-3 off.
        torch.testing.assert_close(loss, exact, rtol=5e-4, atol=0.0)


def test_siglip_known_values():
    # scale 0, bias 0: every one of the B^2 terms is log 2, so L = B log 2.
    eye = torch.eye(4)
    zero = torch.tensor(0.0)
    assert math.isclose(siglip_loss(eye, eye, zero, zero).item(), 4 * math.log(2), rel_tol=1e-6)
    assert math.isclose(chunked_siglip_loss(eye, eye, zero, zero, 3).item(), 4 * math.log(2), rel_tol=1e-6)
    # Orthonormal pairs, scale 100, bias -50: positives at +50, negatives at -50, so L -> 0.
    assert siglip_loss(eye, eye, torch.tensor(100.0), torch.tensor(-50.0)).item() < 1e-12 + 4 * math.exp(-50)


def test_chunked_keeps_no_logits_alive_between_forward_and_backward():
    # What autograd keeps between forward and backward is what makes the backward memory-heavy:
    # the plain loss keeps its (B, B) logits; unchecked blocks would keep B^2 in (B, chunk) pieces;
    # each checkpointed block keeps only its inputs (scale * a, a (chunk, E) view of b, the bias).
    B, E, chunk = 64, 4, 16
    a, b, s, t = _inputs(B=B, E=E)
    saved: list[int] = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        siglip_loss(a, b, s, t)
    assert sum(saved) >= B * B  # the probe sees the plain loss's logits, so it can fail
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = chunked_siglip_loss(a, b, s, t, chunk)
    assert max(saved) <= B * E and sum(saved) < B * B // 2
    loss.backward()  # and the checkpointed graph still runs
    assert a.grad is not None and torch.isfinite(a.grad).all()


def test_no_grad_and_empty_batches():
    a, b, s, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(chunked_siglip_loss(a, b, s, t, 3), siglip_loss(a, b, s, t))
    empty = a[:0]
    for loss in (siglip_loss(empty, b[:0], s, t), chunked_siglip_loss(empty, b[:0], s, t, 3)):
        assert loss.item() == 0.0  # a sum of no terms, not NaN
        assert torch.autograd.grad(loss, t)[0].item() == 0.0


def test_mismatched_shapes_and_bad_chunk_fail_clearly():
    a, b, s, t = _inputs()
    with pytest.raises(ValueError, match="row-aligned"):
        siglip_loss(a, b[:-1], s, t)
    with pytest.raises(ValueError, match="positive"):
        chunked_siglip_loss(a, b, s, t, 0)


def _features(a, b):
    return {m: Features(Tokens(e[:, None], None), e, e) for m, e in (("image", a), ("text", b))}


def test_objective_init_values_and_flags():
    obj = SigLIP()
    assert math.isclose(obj.logit_scale.item(), math.log(10.0), rel_tol=1e-6)
    assert math.isclose(obj.scale().item(), 10.0, rel_tol=1e-6)
    assert obj.logit_bias.item() == -10.0
    assert obj.logit_scale.requires_grad and obj.logit_bias.requires_grad
    frozen = SigLIP(learn_temperature=False, learn_bias=False)
    assert not frozen.logit_scale.requires_grad and not frozen.logit_bias.requires_grad


def test_objective_value_metrics_and_parameter_gradients():
    a, b, _, _ = _inputs(B=6)
    a, b = a.detach().float(), b.detach().float()
    obj = SigLIP()
    out = obj(_features(a, b), {})
    assert set(out) == {"siglip_loss", "logit_scale", "logit_bias"}
    torch.testing.assert_close(out["siglip_loss"], siglip_loss(a, b, torch.tensor(10.0), torch.tensor(-10.0)))
    assert math.isclose(out["logit_scale"].item(), 10.0, rel_tol=1e-6) and out["logit_bias"].item() == -10.0
    gs, gb = torch.autograd.grad(out["siglip_loss"], (obj.logit_scale, obj.logit_bias))
    assert gs.item() != 0.0 and gb.item() != 0.0


def test_objective_chunked_equals_plain_and_clamps_scale():
    a, b, _, _ = _inputs(B=9)
    feats = _features(a.detach().float(), b.detach().float())
    plain, chunked = SigLIP(), SigLIP(chunk_size=4)
    torch.testing.assert_close(chunked(feats, {})["siglip_loss"], plain(feats, {})["siglip_loss"])
    with torch.no_grad():
        plain.logit_scale.fill_(10.0)  # e^10 > 100
    assert math.isclose(plain(feats, {})["logit_scale"].item(), 100.0, rel_tol=1e-5)


def test_objective_uses_only_rows_with_both_modalities():
    a, b, _, _ = _inputs(B=6)
    a, b = a.detach().float(), b.detach().float()
    present = {
        "image": torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool),
        "text": torch.tensor([1, 1, 1, 1, 0, 1], dtype=torch.bool),
    }
    feats = _features(a[present["image"]], b[present["text"]])  # each side holds only its present rows
    both = present["image"] & present["text"]
    expected = siglip_loss(a[both], b[both], torch.tensor(10.0), torch.tensor(-10.0))
    for obj in (SigLIP(), SigLIP(chunk_size=2)):
        torch.testing.assert_close(obj(feats, {"present": present})["siglip_loss"], expected)


def test_task_logs_siglip_metrics_by_name():
    class Fixed(torch.nn.Module):
        def forward(self, batch):
            return batch["features"]

    a, b, _, _ = _inputs()
    out = Task(Fixed(), [SigLIP()], [2.0])({"features": _features(a.detach().float(), b.detach().float())})
    assert set(out) == {"loss", "siglip_loss", "siglip/logit_scale", "siglip/logit_bias"}
    torch.testing.assert_close(out["loss"], 2.0 * out["siglip_loss"])


@pytest.mark.parametrize(
    "cfg,field",
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"modalities": ["image", "image"]}, "modalities"),
        ({"chunk": 8}, "chunk"),
    ],
)
def test_bad_config_names_the_field(cfg, field):
    with pytest.raises(ConfigError, match=f"objectives.0.{field}"):
        OBJECTIVES.create("siglip", where="objectives.0", **cfg)
