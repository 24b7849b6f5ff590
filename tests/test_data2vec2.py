"""data2vec 2.0 on top of the latent-target objective (issue #17.4): multi-mask training (one teacher
pass, M masked copies of each sample, the loss the mean of the M single-mask losses) and the
teacher's rising decay as a function of the trainer's step. Resume mid-schedule is covered by the
resume test of test_data2vec.py, which runs the schedule and two masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coalign.config import ObjectiveSpec
from coalign.models.masking import block_keep, random_keep
from coalign.objectives.data2vec import Data2Vec, ema_decay
from coalign.objectives.mae import patch_loss
from coalign.objectives.task import Task
from coalign.registry import ConfigError
from parts import tiny_batch, tiny_model, transforms_for, world


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    source = world(["image", "text"])
    transforms = transforms_for(["image", "text"], source, tmp_path_factory.mktemp("d2v2"))
    return transforms, tiny_batch(source, transforms, size=5, missing="text")


def d2v_task(transforms, **options):
    torch.manual_seed(0)
    model = tiny_model(transforms)
    spec = ObjectiveSpec(name="data2vec", **{**Data2Vec.Config.tiny(), **options})
    return Task.from_specs(model, [ObjectiveSpec(name="clip"), spec], transforms).train()


def brute_mse_at_hidden(pred: np.ndarray, target: np.ndarray, keep: np.ndarray) -> float:
    """Mean over every (sample, hidden patch) of the squared error averaged over the channels."""
    B, P, _ = pred.shape
    errors = [
        ((pred[b, p] - target[b, p]) ** 2).mean() for b in range(B) for p in range(P) if p not in keep[b]
    ]
    return float(np.mean(errors))


def grads(task: Task) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("masks", [2, 3])
def test_multi_mask_loss_is_the_mean_of_single_mask_losses_vs_brute_force(parts, masks):
    """Same masks, same teacher targets: the M-mask loss (value and gradient) equals the mean of M
    single-mask losses, each computed by brute force from the student's predictions."""
    transforms, batch = parts
    task = d2v_task(transforms, num_masks=masks, mask_ratio=0.5)
    d2v, x = task.objectives[1], batch["image"]
    B, P = x.shape[0], task.model.towers["image"].grid ** 2
    keep = random_keep(B * masks, P, 0.5, x.device)  # (B * M, K): sample b's mask m at row b * M + m
    loss, target = d2v.latent_loss(x, keep)
    loss.backward()
    want_grads = grads(task)
    task.zero_grad(set_to_none=True)

    singles, brute = [], []
    for m in range(masks):
        pred, _ = d2v.predict(x, keep[m::masks])  # one mask per sample: the single-mask student
        singles.append(patch_loss(pred, target, keep[m::masks], norm=False))
        as_np = (pred.detach().double().numpy(), target.double().numpy(), keep[m::masks].numpy())
        brute.append(brute_mse_at_hidden(*as_np))
    assert loss.item() == pytest.approx(np.mean(brute), rel=1e-5)
    torch.stack(singles).mean().backward()
    got_grads = grads(task)
    assert got_grads.keys() == want_grads.keys()
    assert any(k.startswith("model.towers.image.") for k in got_grads), "the student's gradient too"
    for name, g in got_grads.items():
        torch.testing.assert_close(want_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_one_mask_is_the_single_mask_objective_draw_for_draw(parts):
    """num_masks 1 (the default) draws and computes what the single-mask objective did: the tower's
    patches, random_keep over (B, P), the decoder, the MSE at the hidden patches, bit for bit."""
    transforms, batch = parts
    task = d2v_task(transforms)
    d2v, x = task.objectives[1], batch["image"]
    assert d2v.cfg.num_masks == 1
    torch.manual_seed(7)
    got = d2v(None, batch)["data2vec_loss"]
    torch.manual_seed(7)
    tower = task.model.towers["image"]
    target = d2v.targets(x)
    patches = tower.patches(x)
    keep = random_keep(x.shape[0], patches.count, d2v.cfg.mask_ratio, x.device)
    pred = d2v.decoder(tower.encode_patches(patches.tokens, keep).tokens, keep, patches)
    assert torch.equal(got, patch_loss(pred, target, keep, norm=False))


@pytest.mark.parametrize("masks", [1, 4])
def test_the_teacher_runs_once_per_step_whatever_the_number_of_masks(parts, masks):
    transforms, batch = parts
    task = d2v_task(transforms, num_masks=masks)
    d2v, tower = task.objectives[1], task.model.towers["image"]
    calls = {"teacher": 0, "patch_embed": 0, "rows": []}

    def count(key):
        def hook(_module, _args):
            calls[key] += 1

        return hook

    hooks = [
        d2v.teacher.shadow.register_forward_pre_hook(count("teacher")),
        tower.patch_embed.register_forward_pre_hook(count("patch_embed")),
        tower.transformer.register_forward_pre_hook(lambda _m, args: calls["rows"].append(args[0].shape[0])),
    ]
    try:
        out = task(batch)
    finally:
        for h in hooks:
            h.remove()
    B = batch["image"].shape[0]
    assert torch.isfinite(out["data2vec_loss"])
    assert calls["teacher"] == 1, "one teacher pass over the full batch"
    assert calls["patch_embed"] == 2, "the student's patches are embedded once (CLIP's pass is the other)"
    assert sorted(calls["rows"]) == sorted([B, B * masks]), "CLIP's B rows, then the student's B * M"


def test_the_momentum_follows_data2vecs_schedule():
    start, end, steps = 0.999, 0.99999, 10
    d2v = Data2Vec(momentum=start, momentum_end=end, momentum_steps=steps)
    for s in range(0, 16):
        want = start + (end - start) * min(s, steps) / steps  # linear, then constant
        assert d2v.decay_at(s) == pytest.approx(want, rel=0, abs=1e-15), s
    assert d2v.decay_at(steps) == end and d2v.decay_at(10**9) == end
    assert Data2Vec(momentum=0.998).decay_at(5) == 0.998, "no momentum_end: constant"
    assert ema_decay(3, 0.5, 0.9, 4) == pytest.approx(0.8)


def test_the_ema_update_uses_the_steps_decay_and_a_frozen_teacher_stays(parts):
    transforms, _ = parts
    task = d2v_task(transforms, momentum=0.5, momentum_end=1.0, momentum_steps=4)
    d2v, tower = task.objectives[1], task.model.towers["image"]
    gen = torch.Generator().manual_seed(3)
    for step in range(1, 7):
        before = {n: p.clone() for n, p in d2v.teacher.shadow.named_parameters()}
        with torch.no_grad():  # the optimizer's step, stood in for by a random move of the tower
            for p in tower.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        task.after_step(step)
        tau = 0.5 + 0.5 * min(step, 4) / 4
        for name, p in tower.named_parameters():
            expected = tau * before[name] + (1 - tau) * p.detach()
            got = d2v.teacher.shadow.get_parameter(name)
            if tau == 1.0:
                assert torch.equal(got, before[name]), f"step {step}: a decay of 1 freezes the teacher"
            else:
                torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_bad_schedule_and_masks_fail_at_start_naming_the_field(parts):
    transforms, _ = parts
    with pytest.raises(ConfigError, match="momentum_end and momentum_steps go together"):
        d2v_task(transforms, momentum_end=0.9999)
    with pytest.raises(ConfigError, match="num_masks"):
        d2v_task(transforms, num_masks=0)
    with pytest.raises(ConfigError, match="momentum_end"):
        d2v_task(transforms, momentum_end=1.5, momentum_steps=10)


def kept_neighbours(keep: torch.Tensor, rows: int, cols: int) -> float:
    """The mean number of kept 4-neighbours of a kept patch: high for blocks, low for scattered ones."""
    seen = torch.zeros(keep.shape[0], rows * cols, dtype=torch.bool).scatter(1, keep, True)
    grid = torch.nn.functional.pad(seen.view(-1, rows, cols).float(), (1, 1, 1, 1))
    around = grid[:, :-2, 1:-1] + grid[:, 2:, 1:-1] + grid[:, 1:-1, :-2] + grid[:, 1:-1, 2:]
    return (around * seen.view(-1, rows, cols)).sum().item() / seen.sum().item()


@pytest.mark.parametrize("ratio", [0.6, 0.75, 0.9])
def test_block_keep_keeps_as_many_as_random_keep_in_contiguous_blocks(ratio):
    torch.manual_seed(0)
    rows, cols, B = 8, 6, 200
    keep = block_keep(B, (rows, cols), ratio, 3, torch.device("cpu"))
    want_k = random_keep(1, rows * cols, ratio, torch.device("cpu")).shape[1]
    assert keep.shape == (B, want_k), "the same K as random_keep"
    assert (keep.diff(dim=1) > 0).all() and keep.min() >= 0 and keep.max() < rows * cols, "sorted, distinct"
    assert len({tuple(k.tolist()) for k in keep}) > B // 2, "the masks differ between samples"
    scattered = kept_neighbours(random_keep(B, rows * cols, ratio, torch.device("cpu")), rows, cols)
    blocks = kept_neighbours(keep, rows, cols)
    assert blocks > 1.5 * scattered, (blocks, scattered)


def test_block_keep_of_single_patches_is_a_uniform_mask():
    """block 1: every patch is visible equally often (no edge bias), each sample exactly K."""
    torch.manual_seed(1)
    keep = block_keep(4000, (4, 4), 0.75, 1, torch.device("cpu"))
    counts = torch.zeros(16).index_add_(0, keep.flatten(), torch.ones(keep.numel()))
    assert keep.shape == (4000, 4)
    np.testing.assert_allclose(counts.numpy() / 4000, 0.25, atol=0.03)


def test_block_masking_trains_with_several_masks_and_needs_a_grid(parts, tmp_path):
    transforms, batch = parts
    task = d2v_task(transforms, mask="block", block_size=2, num_masks=2)
    d2v = task.objectives[1]
    torch.manual_seed(5)
    patches = task.model.towers["image"].patches(batch["image"]).repeat(2)
    keep = d2v.draw_keep(patches)
    assert keep.shape[0] == 2 * batch["image"].shape[0]
    out = task(batch)
    out["loss"].backward()
    assert torch.isfinite(out["data2vec_loss"])
    assert task.model.towers["image"].patch_embed.weight.grad is not None
    source = world(["points", "text"])
    point_transforms = transforms_for(["points", "text"], source, tmp_path)
    with pytest.raises(ConfigError, match="mask 'block' needs a grid of patches"):
        Data2Vec(modality="points", mask="block", top_k=1).bind(tiny_model(point_transforms))
