"""MAE, Audio-MAE and Point-MAE (issue #17): patch layouts, targets and losses against brute force
(per-patch normalised MSE on hidden image and spectrogram patches only, Chamfer distance on hidden
point patches), one masking path for every patch tower, the tower shared with the contrastive
objective, wrong towers refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coalign.models.masking import random_keep
from coalign.objectives.mae import MAE, NORM_EPS, chamfer_l2, patch_loss, patchify, set_loss
from coalign.objectives.task import Task
from coalign.registry import ConfigError
from parts import bad_grads, tiny_batch, tiny_encoder, tiny_model, transforms_for, world


def mae_loss(pred, images, keep, p, norm_pix):
    return patch_loss(pred, patchify(images, (p, p)), keep, norm_pix)


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
    np.testing.assert_allclose(
        patchify(images, (4, 4)).numpy(), brute_patches(images.numpy(), 4), rtol=0, atol=0
    )


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


def test_a_checkpoint_from_before_the_decoder_part_still_loads(parts):
    """Runs saved with the decoder's tensors directly under the objective (before 2026-12-02)."""
    transforms, _ = parts
    from coalign.config import ObjectiveSpec

    specs = [ObjectiveSpec(name="clip"), ObjectiveSpec(name="mae", **MAE.Config.tiny())]
    torch.manual_seed(0)
    saved = Task.from_specs(tiny_model(transforms), specs, transforms).state_dict()
    old = {k.replace("objectives.1.decoder.", "objectives.1.", 1): v for k, v in saved.items()}
    assert "objectives.1.mask_token" in old and "objectives.1.decoder.mask_token" not in old
    torch.manual_seed(1)
    task = Task.from_specs(tiny_model(transforms), specs, transforms)
    task.load_state_dict(old)  # strict
    for k, v in task.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_mae_needs_a_patch_tower(parts):
    transforms, _ = parts
    model = tiny_model(transforms)
    with pytest.raises(ConfigError, match="modality 'audio' has no tower.*needs a patch tower .vit, audio"):
        MAE(modality="audio").bind(model)
    with pytest.raises(ConfigError, match="'TextTransformer' tower"):
        MAE(modality="text").bind(model)


# ------------------------------------------------------------------------------ Audio-MAE, Point-MAE


def brute_chamfer(a: np.ndarray, b: np.ndarray) -> float:
    d = lambda u, v: sum((x - y) ** 2 for x, y in zip(u, v, strict=True))  # noqa: E731
    forward = np.mean([min(d(p, q) for q in b) for p in a])
    backward = np.mean([min(d(q, p) for p in a) for q in b])
    return forward + backward


def test_chamfer_matches_brute_force_and_ignores_order():
    torch.manual_seed(0)
    a, b = torch.randn(3, 5, 3), torch.randn(3, 7, 3)
    got = chamfer_l2(a, b)
    want = [brute_chamfer(a[i].double().numpy(), b[i].double().numpy()) for i in range(3)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    torch.testing.assert_close(chamfer_l2(a[:, torch.randperm(5)], b[:, torch.randperm(7)]), got)
    assert chamfer_l2(b, b).abs().max() == 0


def test_set_loss_averages_chamfer_over_hidden_patches_only():
    torch.manual_seed(1)
    target = torch.randn(2, 4, 6, 3)
    pred = torch.randn(2, 4, 18, requires_grad=True)
    keep = torch.tensor([[0, 2], [3, 1]]).sort(1).values
    want = np.mean(
        [
            brute_chamfer(pred[b].detach().view(4, 6, 3)[g].double().numpy(), target[b, g].double().numpy())
            for b in range(2)
            for g in range(4)
            if g not in keep[b]
        ]
    )
    loss = set_loss(pred, target, keep)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    visible = torch.zeros(2, 4, dtype=torch.bool).scatter(1, keep, True)
    assert (pred.grad[visible] == 0).all() and (pred.grad[~visible] != 0).any()


AUDIO = {"n_fft": 256, "hop_length": 128, "n_mels": 32, "patch": (8, 4)}  # as test_modality_encoders


def test_audio_patches_are_the_log_mel_patches_the_tokens_embed():
    torch.manual_seed(0)
    tower = tiny_encoder("audio_transformer", **AUDIO).eval()
    wave = tower.example_input(tower.cfg, batch=2)
    patches = tower.patches(wave, targets=True)
    mel = tower.log_mel(wave).numpy()  # (B, M, frames)
    pf, pt = tower.cfg.patch
    frames = -(-mel.shape[-1] // pt) * pt
    mel = np.pad(mel, ((0, 0), (0, 0), (0, frames - mel.shape[-1])))
    rows, cols = patches.grid
    assert (rows, cols) == (32 // pf, frames // pt) and patches.count == rows * cols
    for b in range(2):
        for i in range(rows):
            for j in range(cols):
                want = [mel[b, i * pf + y, j * pt + x] for y in range(pf) for x in range(pt)]
                np.testing.assert_allclose(patches.target[b, i * cols + j].numpy(), want, rtol=0, atol=0)
    # token k is the stride-patch convolution of target patch k (plus its position): same order
    w = tower.patch_embed.weight.flatten(1)  # (D, pf * pt)
    pos = tower.pos_embed[:, :, :cols].flatten(1, 2)
    torch.testing.assert_close(patches.tokens, patches.target @ w.T + tower.patch_embed.bias + pos)
    # the forward is the masking path with nothing hidden, and `keep` encodes only those patches
    torch.testing.assert_close(tower(wave).tokens, tower.encode_patches(patches.tokens).tokens)
    keep = random_keep(2, patches.count, 0.75, wave.device)
    assert tower(wave, keep).tokens.shape == (2, 1 + keep.shape[1], tower.width)


def test_audio_loss_counts_hidden_patches_only_normalised_vs_brute_force():
    torch.manual_seed(2)
    target = torch.randn(3, 6, 8) * 3 + 1
    pred = torch.randn(3, 6, 8)
    keep = random_keep(3, 6, 0.5, torch.device("cpu"))
    for norm in (True, False):
        total, count = 0.0, 0
        for b in range(3):
            for k in range(6):
                if k in keep[b]:
                    continue
                t = target[b, k].double().numpy()
                if norm:
                    t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + NORM_EPS)
                total += ((pred[b, k].double().numpy() - t) ** 2).mean()
                count += 1
        assert patch_loss(pred, target, keep, norm).item() == pytest.approx(total / count, rel=1e-5)


def test_point_patches_are_the_neighbourhoods_of_their_centres():
    torch.manual_seed(0)
    tower = tiny_encoder("point_transformer").eval()
    cloud = tower.example_input(tower.cfg, batch=2)
    patches = tower.patches(cloud, targets=True)
    G, k = tower.cfg.groups, tower.cfg.group_size
    assert patches.kind == "set" and patches.target.shape == (2, G, k, 3) and patches.grid is None
    for b in range(2):
        for g in range(G):
            centre = patches.centres[b, g]
            d = (cloud[b, :, :3] - centre).pow(2).sum(-1)
            nearest = cloud[b, d.argsort()[:k], :3] - centre  # brute-force k nearest, relative
            got = patches.target[b, g]
            assert torch.cdist(got, nearest).min(1).values.max() < 1e-5
    torch.testing.assert_close(tower(cloud).tokens, tower.encode_patches(patches.tokens).tokens)


@pytest.fixture(scope="module")
def audio_points(tmp_path_factory):
    source = world(["audio", "points", "text"])
    transforms = transforms_for(["audio", "points", "text"], source, tmp_path_factory.mktemp("amae"))
    return transforms, tiny_batch(source, transforms, size=4)


@pytest.mark.parametrize("modality", ["audio", "points"])
def test_audio_and_point_mae_train_their_tower_and_decoder(audio_points, modality):
    transforms, batch = audio_points
    torch.manual_seed(0)
    model = tiny_model(transforms)
    from coalign.config import ObjectiveSpec

    spec = ObjectiveSpec(name="mae", modality=modality, mask_ratio=0.6, **MAE.Config.tiny())
    task = Task.from_specs(model, [spec], transforms)
    out = task(batch)
    loss = out[f"mae_{modality}_loss"]  # named by the tower, so one recipe can mask several
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    mae = task.objectives[0]
    assert not bad_grads(mae, every=True), "every decoder parameter gets a gradient"
    assert (mae.decoder.centre_pos is not None) == (modality == "points")
    embed = model.towers[modality].patch_embed
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in embed.parameters())
