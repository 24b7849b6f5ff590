"""Checkpoints are atomic, and a killed run resumes to the same weights as an uninterrupted one."""

import json

import pytest
import torch

from coalign.build import load_run
from coalign.checkpoint import LATEST, MANIFEST, latest_checkpoint, load_weights, save_checkpoint
from coalign.train.loop import train


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tmp_path, tiny_recipe):
    recipe = tiny_recipe("train.steps=8", "train.checkpoint_every=3", "data.batch_size=16")
    full = train(recipe, tmp_path / "full", progress=False)
    assert full.step == 8

    cut = train(recipe, tmp_path / "cut", progress=False, stop_after=5)  # "killed" after step 5
    assert cut.step == 5 and cut.results is None
    assert latest_checkpoint(tmp_path / "cut").name == "step_00000005"
    resumed = train(None, tmp_path / "cut", resume=True, progress=False)
    assert resumed.step == 8

    a = load_weights(latest_checkpoint(tmp_path / "full"))
    b = load_weights(latest_checkpoint(tmp_path / "cut"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)
    assert resumed.results.flat().keys() == full.results.flat().keys()
    # The metrics log continues rather than restarting.
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps)


@pytest.mark.slow
def test_refuses_to_overwrite_a_run_and_loads_for_evaluation(tmp_path, tiny_recipe):
    recipe = tiny_recipe("train.steps=2")
    train(recipe, tmp_path / "run", progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(recipe, tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    assert run.step == 2 and set(run.model.modalities) == {"image", "text"}
    ids = run.transforms["text"].encode(["a red circle"])
    emb = run.model.encode("text", ids)
    assert emb.shape == (1, run.model.embed_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(1))


def test_checkpoint_writes_are_atomic_and_pruned(tmp_path):
    w = {"a": torch.arange(4.0)}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, w, {"x": step}, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step_00000002", "step_00000003"]
    assert (root / "step_00000003" / MANIFEST).is_file()
    assert (root / LATEST).read_text() == "step_00000003"
    # A crash mid-write leaves a hidden temporary folder, never a half checkpoint that LATEST names.
    (root / ".step_00000004.tmp").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000003"


def test_optimizer_groups_decay_and_lr_scales():
    from coalign.config import TrainConfig
    from coalign.train.optim import build_optimizer

    module = torch.nn.ModuleDict(
        {"model": torch.nn.Linear(3, 4), "objectives": torch.nn.ModuleList([torch.nn.Linear(2, 2)])}
    )
    opt = build_optimizer(module, TrainConfig(lr=0.1, weight_decay=0.2), {"objectives.0.": 10.0})
    groups = {(g["weight_decay"], g["lr"]): sum(p.numel() for p in g["params"]) for g in opt.param_groups}
    assert groups == {(0.2, 0.1): 12, (0.0, 0.1): 4, (0.2, 1.0): 4, (0.0, 1.0): 2}


def test_a_tower_s_lr_scale_reaches_its_parameters_and_not_its_head(tmp_path, tiny_recipe):
    """`model.towers.text.lr_scale`: every text-tower parameter (decayed or not) steps at the
    scaled rate; the image tower, every head and the objective's temperature at the base rate."""
    from coalign.train.session import setup

    recipe = tiny_recipe("train.lr=0.01", "model.towers.text.lr_scale=0.25")
    session = setup(recipe, tmp_path / "run")
    lr_of = {
        name: g["initial_lr"]  # the scheduler scales "lr" by the warmup factor
        for g in session.state.optimizer.param_groups
        for p in g["params"]
        for name, q in session.state.task.named_parameters()
        if q is p
    }
    text = {n for n in lr_of if n.startswith("model.towers.text.")}
    assert text and any(n.endswith("bias") for n in text) and any(n.endswith("weight") for n in text)
    assert {lr_of[n] for n in text} == {0.0025}
    assert {lr_of[n] for n in lr_of.keys() - text} == {0.01}
    assert any(n.startswith("model.heads.text") for n in lr_of)
    assert any(n.startswith("objectives.") for n in lr_of)


def test_fused_adamw_takes_the_foreach_steps():
    """The trainer's AdamW is the fused kernel on the CPU: the same updates as the foreach form."""
    from coalign.config import TrainConfig
    from coalign.train.optim import build_optimizer

    cfg = TrainConfig(lr=0.01, weight_decay=0.1)
    weights = []
    for kind in ("built", "foreach"):
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 2))
        opt = build_optimizer(module, cfg)
        if kind == "foreach":
            opt = torch.optim.AdamW(opt.param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=True)
        else:
            assert opt.defaults["fused"]
        for step in range(4):
            module.zero_grad()
            module(torch.randn(9, 5, generator=torch.Generator().manual_seed(step))).square().sum().backward()
            opt.step()
        weights.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-6, atol=1e-7)
