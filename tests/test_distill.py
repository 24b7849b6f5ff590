"""Soft targets for InfoNCE (label smoothing, self-distillation) and distillation from a teacher run,
against brute-force float64 loops in value and gradient; the teacher stays frozen and unsaved."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from coalign.build import build_model, build_source, build_transforms, prepare_transforms
from coalign.config import load_recipe
from coalign.data.loader import BatchDataset
from coalign.data.transforms.base import Pipeline
from coalign.objectives.contrastive import InfoNCE, info_nce, soft_info_nce
from coalign.objectives.distill import check_compatible, distill_kl
from coalign.objectives.task import Task
from coalign.registry import ConfigError
from coalign.train.loop import train


def _pair(B=6, E=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(B, E, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(B, E, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    return a, b


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


# ------------------------------------------------------------------------- soft targets for InfoNCE


def brute_force_soft_info_nce(a, b, scale, eps, alpha):
    """1/2B sum over directions and rows i of -sum_j target_ij log softmax_j(scale x_i . y_j), with
    target_ij = (1 - alpha) [(1 - eps) [i == j] + eps / B] + alpha softmax_j(scale x_i . x_j) (detached),
    for (x, y) = (a, b) and (b, a)."""
    B = a.shape[0]
    total = 0.0
    for x, y in ((a, b), (b, a)):
        for i in range(B):
            logits = [scale * (x[i] * y[j]).sum() for j in range(B)]
            log_z = torch.log(sum(torch.exp(v) for v in logits))
            self_sims = [torch.exp(scale.detach() * (x[i] * x[j]).sum()).detach() for j in range(B)]
            for j in range(B):
                hard = (1 - eps) * (1.0 if i == j else 0.0) + eps / B
                target = (1 - alpha) * hard + alpha * self_sims[j] / sum(self_sims)
                total = total - target * (logits[j] - log_z)
    return total / (2 * B)


@pytest.mark.parametrize("eps, alpha", [(0.1, 0.0), (0.0, 0.4), (0.2, 0.3)])
def test_soft_info_nce_matches_brute_force(eps, alpha):
    a, b = _pair()
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    fast = soft_info_nce(a, b, scale, eps, alpha)
    slow = brute_force_soft_info_nce(a, b, scale, eps, alpha)
    torch.testing.assert_close(fast, slow)
    for got, want in zip(_grads(fast, (a, b, scale)), _grads(slow, (a, b, scale)), strict=True):
        torch.testing.assert_close(got, want)


def test_no_soft_targets_is_exactly_info_nce():
    a, b = _pair()
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    assert torch.equal(soft_info_nce(a, b, scale), info_nce(a, b, scale))
    obj = InfoNCE()
    x, y = a.detach().float(), b.detach().float()
    feats = {"image": SimpleNamespace(embedding=x), "text": SimpleNamespace(embedding=y)}
    assert torch.equal(obj(feats, {})["clip_loss"], info_nce(x, y, obj.scale()))
    smoothed = InfoNCE(label_smoothing=0.1)(feats, {})["clip_loss"]  # and the options do change it
    assert not torch.allclose(smoothed, obj(feats, {})["clip_loss"])


def test_self_distill_is_not_a_rescaled_hard_loss():
    """Why the soft targets come from the anchor's own modality (contrastive.py's docstring): targets
    from the trained cross-modal prediction itself would give exactly (1 - alpha) x the hard gradient."""
    a, b = _pair()
    scale, alpha = torch.tensor(5.0, dtype=torch.float64), 0.4
    hard = _grads(info_nce(a, b, scale), (a, b))

    logits = scale * a @ b.T
    eye = torch.eye(6, dtype=torch.float64)
    cross = [(1 - alpha) * eye + alpha * torch.softmax(z, -1).detach() for z in (logits, logits.T)]
    naive = 0.5 * (F.cross_entropy(logits, cross[0]) + F.cross_entropy(logits.T, cross[1]))
    for g, h in zip(_grads(naive, (a, b)), hard, strict=True):
        torch.testing.assert_close(g, (1 - alpha) * h)  # the degenerate case

    ours = _grads(soft_info_nce(a, b, scale, self_distill=alpha), (a, b))
    assert not torch.allclose(ours[0], (1 - alpha) * hard[0])


# ------------------------------------------------------------------------------------ distillation


def brute_force_distill(a, b, ta, tb, T):
    """T^2/2 [ 1/M sum_i KL(p^t_i. || p_i.) + 1/M sum_j KL(p^t_.j || p_.j) ], p = softmax(cos / T)."""
    M = a.shape[0]

    def sim(x, y, i, j):
        return (x[i] * y[j]).sum() / T

    total = 0.0
    for rows in (True, False):  # image -> text rows, then text -> image columns
        for i in range(M):
            pairs = [(i, j) if rows else (j, i) for j in range(M)]
            s = [sim(a, b, *p) for p in pairs]
            t = [sim(ta, tb, *p) for p in pairs]
            zs = sum(torch.exp(v) for v in s)
            zt = sum(torch.exp(v) for v in t)
            for sv, tv in zip(s, t, strict=True):
                pt = torch.exp(tv) / zt
                total = total + pt * (torch.log(pt) - torch.log(torch.exp(sv) / zs))
    return T**2 * total / (2 * M)


@pytest.mark.parametrize("T", [1.0, 0.2])
def test_distill_matches_brute_force_value_and_gradient(T):
    a, b = _pair()
    ta, tb = _pair(E=3, seed=1)  # the teacher may have another embedding size
    ta, tb = ta.detach(), tb.detach()
    fast = distill_kl(a, b, ta, tb, T)
    slow = brute_force_distill(a, b, ta, tb, T)
    torch.testing.assert_close(fast, slow)
    for got, want in zip(_grads(fast, (a, b)), _grads(slow, (a, b)), strict=True):
        torch.testing.assert_close(got, want)
    assert fast.item() > 1e-3
    # A student with the teacher's similarities has nothing left to learn.
    assert distill_kl(ta, tb, ta, tb, T).abs().item() < 1e-12


def test_compatibility_check_names_what_differs():
    def tok(vocab):
        return SimpleNamespace(get_vocab=lambda: vocab)

    text = SimpleNamespace(
        describe=lambda: {"vocab_size": 2, "context_length": 8}, tokenizer=tok({"a": 0, "b": 1})
    )
    teacher = {"text": text}
    tower = SimpleNamespace(cfg=SimpleNamespace(vocab_size=2, context_length=8))
    student = SimpleNamespace(towers={"text": tower})
    check_compatible(student, teacher, ["text"], "x")  # sizes agree; no student transforms to compare
    other = {"text": SimpleNamespace(tokenizer=tok({"a": 1, "b": 0}))}
    with pytest.raises(ConfigError, match="tokenizer differs"):
        check_compatible(student, teacher, ["text"], "x", other)
    tower.cfg.context_length = 16
    with pytest.raises(ConfigError, match=r"text.context_length: teacher 8, student 16.*tokenizer.json"):
        check_compatible(student, teacher, ["text"], "x")
    with pytest.raises(ConfigError, match="no 'image' tower"):
        check_compatible(student, teacher, ["image"], "x")


# ---------------------------------------------------------------------- a real teacher run (slow)

TINY = ["data.train.size=64", "data.eval.heldout_samples.size=16", "data.eval.heldout_combos.size=16"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("teacher")
    train(
        load_recipe("demo", [*TINY, "train.steps=2", "data.batch_size=8"], smoke=True),
        run_dir,
        progress=False,
    )
    return run_dir


def _student(run_dir, teacher, *overrides, tokenizer_from=None):
    objectives = f"objectives=[{{name: clip}}, {{name: distill, teacher: '{teacher}', temperature: 0.1}}]"
    tokenizer = f"data.transforms.text.path={tokenizer_from or teacher}/tokenizer.json"
    recipe = load_recipe("demo", [*TINY, objectives, tokenizer, "model.embed_dim=16", *overrides], smoke=True)
    transforms = build_transforms(recipe)
    source = build_source(recipe.data.train, "data.train")
    run_dir.mkdir()
    prepare_transforms(transforms, source, run_dir, resume=False)
    task = Task.from_specs(build_model(recipe, transforms), recipe.objectives)
    batch = BatchDataset(source, Pipeline(transforms), 8, seed=0)[0]
    return task, batch


@pytest.mark.slow
def test_student_learns_from_a_frozen_unsaved_teacher(tmp_path, teacher_run):
    task, batch = _student(tmp_path / "student", teacher_run)
    distill = task.objectives[1]
    teacher = distill.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    out = task(batch)
    assert set(out) >= {"loss", "clip_loss", "distill_loss"} and math.isfinite(out["distill_loss"].item())
    out["loss"].backward()

    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    params = {id(p) for p in task.parameters()}
    assert not any(id(p) in params for p in teacher.parameters())  # never reaches the optimiser
    assert not any(k.startswith("objectives.1") for k in task.state_dict())  # nor the checkpoint
    assert any(p.grad is not None for p in task.model.parameters())  # the student does learn
    task.train()
    assert not teacher.training  # Task.train() does not reach it either
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, before[k])


@pytest.mark.slow
def test_incompatible_student_fails_at_bind(tmp_path, teacher_run):
    with pytest.raises(ConfigError, match="image.image_size: teacher 64, student 32"):
        _student(tmp_path / "small", teacher_run, "data.transforms.image.size=32")
    with pytest.raises(ConfigError, match="no run or checkpoint folder"):
        _student(tmp_path / "none", tmp_path / "missing", tokenizer_from=teacher_run)
