"""MAE (issue #17): patch layout and loss against brute force, only hidden patches count, the tower is
shared with the contrastive objective, wrong towers are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coalign.models.encoders.vit import random_keep
from coalign.objectives.mae import MAE, NORM_EPS, mae_loss, patchify
from coalign.objectives.task import Task
from coalign.registry import ConfigError
from parts import bad_grads, tiny_batch, tiny_model, transforms_for, world


def brute_patches(images: np.ndarray, p: int) -> np.ndarray:
    B, C, H, W = images.shape
    out = np.zeros((B, (H // p) * (W // p), p * p * C))
    for b in range(B):
        for i in range(H // p):
            for j in range(W // p):
                values = [
                    images[b, c, i * p + y, j * p + x] for y in range(p) for x in range(p) for c in range(C)
                ]
                out[b, i * (W // p) + j] = values
    return out


def brute_loss(pred: np.ndarray, images: np.ndarray, keep: np.ndarray, p: int, norm_pix: bool) -> float:
    target = brute_patches(images, p)
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        for k in range(pred.shape[1]):
            if k in keep[b]:
                continue
            t = target[b, k]
            if norm_pix:
                t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + NORM_EPS)
            total += ((pred[b, k] - t) ** 2).mean()
            count += 1
    return total / count


def test_patchify_matches_the_vit_patch_order():
    images = torch.randn(2, 3, 8, 12)
    np.testing.assert_allclose(patchify(images, 4).numpy(), brute_patches(images.numpy(), 4), rtol=0, atol=0)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_brute_force(norm_pix):
    torch.manual_seed(0)
    images, p = torch.randn(3, 3, 8, 8), 4
    keep = random_keep(3, 4, 0.5, torch.device("cpu"))
    pred = torch.randn(3, 4, p * p * 3)
    got = mae_loss(pred, images, keep, p, norm_pix).item()
    want = brute_loss(pred.numpy(), images.numpy(), keep.numpy(), p, norm_pix)
    assert got == pytest.approx(want, rel=1e-5)


def test_visible_patches_do_not_count():
    torch.manual_seed(1)
    images, p = torch.randn(2, 3, 8, 8), 4
    keep = torch.tensor([[0, 3], [1, 2]])
    pred = torch.randn(2, 4, p * p * 3, requires_grad=True)
    mae_loss(pred, images, keep, p, True).backward()
    visible = torch.zeros(2, 4, dtype=torch.bool).scatter(1, keep, True)
    assert (pred.grad[visible] == 0).all() and (pred.grad[~visible] != 0).any()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    source = world(["image", "text"])
    transforms = transforms_for(["image", "text"], source, tmp_path_factory.mktemp("mae"))
    return transforms, tiny_batch(source, transforms, size=6, missing="text")


def test_clip_and_mae_train_one_tower_and_the_decoder(parts):
    transforms, batch = parts
    torch.manual_seed(0)
    model = tiny_model(transforms)
    from coalign.config import ObjectiveSpec

    specs = [ObjectiveSpec(name="clip"), ObjectiveSpec(name="mae", **MAE.Config.tiny())]
    task = Task.from_specs(model, specs, transforms)
    out = task(batch)
    assert {"clip_loss", "mae_loss"} <= set(out) and torch.isfinite(out["mae_loss"])
    out["mae_loss"].backward()
    mae = task.objectives[1]
    assert not bad_grads(mae, every=True), "every decoder parameter gets a gradient"
    patch = model.towers["image"].patch_embed
    assert patch.weight.grad is not None and patch.weight.grad.abs().sum() > 0
    # the decoder belongs to the objective: the model that evaluation loads has no trace of it
    assert not any("decoder" in k for k in model.state_dict())
    assert any(k.startswith("objectives.1.decoder.") for k in task.state_dict())


def test_mae_needs_a_vit_tower(parts):
    transforms, _ = parts
    model = tiny_model(transforms)
    with pytest.raises(ConfigError, match="modality 'audio' has no tower.*needs a 'vit' tower"):
        MAE(modality="audio").bind(model)
    with pytest.raises(ConfigError, match="'TextTransformer' tower"):
        MAE(modality="text").bind(model)
