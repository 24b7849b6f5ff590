"""InfoNCE against a brute-force evaluation of its formula, in value and gradient."""

import math

import torch
import torch.nn.functional as F

from coalign.models.encoders.base import Tokens
from coalign.models.model import Features
from coalign.objectives.contrastive import InfoNCE, info_nce
from coalign.objectives.task import Task
from helpers import assert_same_value_and_gradient, brute_force_info_nce


def _pair(B=7, E=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(B, E, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(B, E, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    return a, b


def test_info_nce_matches_brute_force_value_and_gradient():
    a, b = _pair()
    scale = torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True)
    assert_same_value_and_gradient(
        lambda: info_nce(a, b, scale), lambda: brute_force_info_nce(a, b, scale), (a, b, scale)
    )


def test_info_nce_known_values():
    # Perfectly aligned orthonormal pairs with a huge scale: loss -> 0. Scale 0: loss = log B.
    eye = torch.eye(4)
    assert info_nce(eye, eye, torch.tensor(100.0)).item() < 1e-6
    assert math.isclose(info_nce(eye, eye, torch.tensor(0.0)).item(), math.log(4), rel_tol=1e-6)


def _features(a, b):
    return {m: Features(Tokens(e[:, None], None), e, e) for m, e in (("image", a), ("text", b))}


def test_objective_temperature_init_and_clamp():
    obj = InfoNCE()
    assert math.isclose(obj.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    with torch.no_grad():
        obj.logit_scale.fill_(10.0)  # e^10 > 100
    a, b = _pair()
    out = obj(_features(a.float(), b.float()), {})
    assert math.isclose(out["logit_scale"].item(), 100.0, rel_tol=1e-5)
    torch.testing.assert_close(out["clip_loss"], info_nce(a.float(), b.float(), torch.tensor(100.0)))


def test_objective_uses_only_rows_with_both_modalities():
    a, b = _pair(B=6)
    a, b = a.detach().float(), b.detach().float()
    present = {
        "image": torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool),
        "text": torch.tensor([1, 1, 1, 1, 0, 1], dtype=torch.bool),
    }
    # Features hold only the present rows of each modality.
    feats = _features(a[present["image"]], b[present["text"]])
    out = InfoNCE()(feats, {"present": present})
    both = present["image"] & present["text"]
    expected = info_nce(a[both], b[both], InfoNCE().scale())
    torch.testing.assert_close(out["clip_loss"], expected)


def test_task_sums_weighted_losses_and_names_metrics():
    class Fixed(torch.nn.Module):
        def forward(self, batch):
            return batch["features"]

    a, b = _pair()
    feats = _features(a.detach().float(), b.detach().float())
    task = Task(Fixed(), [InfoNCE()], [0.5])
    out = task({"features": feats})
    assert set(out) == {"loss", "clip_loss", "clip/logit_scale"}
    torch.testing.assert_close(out["loss"], 0.5 * out["clip_loss"])
