"""data2vec-style latent targets (issue #17.4): the target construction and the loss against brute
force, the teacher an EMA out of the optimizer that follows its formula, the student masked through
the tower's one keep path, and resume bit-identical to an uninterrupted run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coalign.checkpoint import latest_checkpoint, load_weights
from coalign.config import ObjectiveSpec, TrainConfig, load_recipe
from coalign.models.ema import EMA
from coalign.models.masking import random_keep
from coalign.objectives.data2vec import Data2Vec, block_outputs, layer_targets
from coalign.objectives.mae import patch_loss
from coalign.objectives.task import Task
from coalign.registry import ConfigError
from coalign.train.loop import train
from coalign.train.optim import build_optimizer
from parts import bad_grads, tiny_batch, tiny_encoder, tiny_model, transforms_for, world


def brute_targets(layers: list[np.ndarray], instance_norm: bool) -> np.ndarray:
    """Per sample and channel: minus its mean over the patches, over its (biased) std, eps 1e-5."""
    B, P, D = layers[0].shape
    out = np.zeros((B, P, D))
    for y in layers:
        y = y.astype(np.float64)
        for b in range(B):
            for d in range(D):
                col = y[b, :, d]
                out[b, :, d] += (col - col.mean()) / np.sqrt(col.var() + 1e-5) if instance_norm else col
    return out / len(layers)


@pytest.mark.parametrize("instance_norm", [True, False])
def test_targets_average_the_instance_normalised_layers_vs_brute_force(instance_norm):
    torch.manual_seed(0)
    layers = [torch.randn(2, 5, 3) * (i + 1) + i for i in range(3)]
    got = layer_targets(layers, instance_norm).numpy()
    want = brute_targets([y.numpy() for y in layers], instance_norm)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_loss_is_the_mse_at_hidden_patches_vs_brute_force():
    torch.manual_seed(1)
    pred, target = torch.randn(3, 6, 4), torch.randn(3, 6, 4)
    keep = random_keep(3, 6, 0.5, torch.device("cpu"))
    sq = [
        ((pred[b, p] - target[b, p]).double() ** 2).mean().item()
        for b in range(3)
        for p in range(6)
        if p not in keep[b]
    ]
    assert patch_loss(pred, target, keep, norm=False).item() == pytest.approx(np.mean(sq), rel=1e-6)


def test_block_outputs_are_the_feed_forward_outputs_before_the_residual():
    torch.manual_seed(0)
    tower = tiny_encoder("vit", depth=2).eval()
    x = tower.example_input(tower.cfg, batch=2)
    # by hand: the blocks' inputs, then each block's MLP on its second norm
    with torch.no_grad():
        cls = tower.cls_token + tower.pos_embed[:, :1]
        h = tower.norm_pre(torch.cat([cls.expand(2, -1, -1), tower.patches(x).tokens], 1))
        want = []
        for block in tower.transformer.blocks:
            h = h + block.attn(block.norm1(h))
            f = block.mlp(block.norm2(h))
            want.append(f)
            h = h + f
    got = block_outputs(tower, x, 2)
    assert len(got) == 2
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert not tower.transformer.blocks[0].mlp._forward_hooks, "the hooks are removed"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    source = world(["image", "text"])
    transforms = transforms_for(["image", "text"], source, tmp_path_factory.mktemp("d2v"))
    return transforms, tiny_batch(source, transforms, size=6, missing="text")


def d2v_task(transforms, **options):
    torch.manual_seed(0)
    model = tiny_model(transforms)
    spec = ObjectiveSpec(name="data2vec", **{**Data2Vec.Config.tiny(), **options})
    return Task.from_specs(model, [ObjectiveSpec(name="clip"), spec], transforms)


def test_teacher_out_of_the_optimizer_follows_the_ema_formula(parts):
    transforms, batch = parts
    task = d2v_task(transforms).train()
    d2v = task.objectives[1]
    tower = task.model.towers["image"]
    assert not d2v.teacher.shadow.training, "the teacher sees the full input, in eval mode"
    optimized = {id(p) for g in build_optimizer(task, TrainConfig()).param_groups for p in g["params"]}
    assert not any(id(p) in optimized for p in d2v.teacher.parameters())
    assert any(k.startswith("objectives.1.teacher.shadow.transformer.") for k in task.state_dict())

    out = task(batch)
    assert {"clip_loss", "data2vec_loss"} <= set(out) and torch.isfinite(out["data2vec_loss"])
    out["loss"].backward()
    assert not bad_grads(d2v.decoder, every=True), "every decoder parameter gets a gradient"
    assert tower.patch_embed.weight.grad.abs().sum() > 0, "the student is the model's own tower"
    assert all(p.grad is None for p in d2v.teacher.parameters())
    before = {n: p.clone() for n, p in d2v.teacher.shadow.named_parameters()}
    with torch.no_grad():
        for p in task.parameters():
            if p.requires_grad and p.grad is not None:
                p.sub_(0.1 * p.grad.sign())
    task.after_step(1)
    decay = d2v.cfg.momentum
    for name, p in tower.named_parameters():
        expected = decay * before[name] + (1 - decay) * p.detach()
        torch.testing.assert_close(d2v.teacher.shadow.get_parameter(name), expected, rtol=1e-6, atol=1e-7)


def test_the_targets_come_from_the_full_input(parts):
    """The teacher's targets equal the brute-force average over the unmasked tower's blocks."""
    transforms, batch = parts
    task = d2v_task(transforms, top_k=1).train()
    d2v, images = task.objectives[1], batch["image"]
    layers = block_outputs(d2v.teacher.shadow.eval(), images, 1)
    assert layers[0].shape[1] == 1 + task.model.towers["image"].grid ** 2, "every patch, and the CLS"
    want = brute_targets([layers[0][:, 1:].numpy()], True)
    np.testing.assert_allclose(d2v.targets(images).numpy(), want, rtol=1e-4, atol=1e-5)


def test_data2vec_needs_a_patch_tower_and_enough_blocks(parts):
    transforms, _ = parts
    model = tiny_model(transforms)
    with pytest.raises(ConfigError, match="'TextTransformer' tower; masked prediction needs a patch tower"):
        Data2Vec(modality="text").bind(model)
    with pytest.raises(ConfigError, match="top_k 3 exceeds the 1 blocks of the 'image' tower; use 1..1"):
        Data2Vec(top_k=3).bind(model)


@pytest.mark.slow
def test_resume_with_the_teacher_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """Killed at step 3, mid-way through the decay's rise (data2vec 2.0's schedule, two masks per
    sample): the resumed run updates the teacher with the decays of the uninterrupted one and ends
    with the same weights, bit for bit."""
    recipe = load_recipe(
        "data2vec",
        [
            "data.train.size=64",
            "data.eval={}",
            "eval.evaluators=[]",
            "data.batch_size=8",
            "train.steps=5",
            "train.checkpoint_every=2",
            "objectives.1.momentum=0.5",  # a steep rise, so a wrong step shows in the teacher
            "objectives.1.momentum_end=0.9",
            "objectives.1.momentum_steps=4",
            "objectives.1.num_masks=2",
        ],
        smoke=True,
    )
    assert [o.name for o in recipe.objectives] == ["clip", "data2vec"]
    decays: list[float] = []
    update = EMA.update

    def recorded(self, source, decay=None):
        decays.append(decay)
        update(self, source, decay)

    monkeypatch.setattr(EMA, "update", recorded)
    train(recipe, tmp_path / "full", progress=False)
    full, decays[:] = list(decays), []
    assert full == pytest.approx([0.6, 0.7, 0.8, 0.9, 0.9], abs=1e-12), "0.5 + 0.1 s, then 0.9"
    train(recipe, tmp_path / "cut", progress=False, stop_after=3)  # killed after step 3
    train(None, tmp_path / "cut", resume=True, progress=False)
    assert decays == full, "the resumed run's decays are the uninterrupted run's"
    a = load_weights(latest_checkpoint(tmp_path / "full"))
    b = load_weights(latest_checkpoint(tmp_path / "cut"))
    assert a.keys() == b.keys()
    teacher = [k for k in a if k.startswith("objectives.1.teacher.shadow.")]
    assert teacher, "the teacher is in the checkpoint"
    tower = "model.towers.image.patch_embed.weight"
    shadow = "objectives.1.teacher.shadow.patch_embed.weight"
    assert not torch.equal(a[tower], a[shadow]), "after 5 steps the teacher lags the tower"
    for k in a:
        assert torch.equal(a[k], b[k]), k
