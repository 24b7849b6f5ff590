"""Momentum model, queues and momentum distillation (issue #16.4): the EMA update against its
formula, the queue's FIFO order, the ITC-with-queue and distilled MLM losses against brute force,
one shared momentum copy out of the optimizer, and resume equal to an uninterrupted run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from coalign.checkpoint import latest_checkpoint, load_weights
from coalign.config import ObjectiveSpec, TrainConfig, load_recipe
from coalign.models.ema import EMA
from coalign.objectives.mlm import IGNORE, mlm_loss
from coalign.objectives.momentum import FeatureQueue, itc_loss
from coalign.objectives.task import Task
from coalign.registry import ConfigError
from coalign.train.loop import train
from coalign.train.optim import build_optimizer
from parts import tiny_batch, tiny_fusion, tiny_model, transforms_for, world

# ------------------------------------------------------------------------------------------- EMA


def test_ema_update_equals_its_formula_and_copies_buffers():
    torch.manual_seed(0)
    source = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(source, decay=0.9)
    assert all(not p.requires_grad for p in ema.parameters())
    before = {k: v.clone() for k, v in ema.shadow.state_dict().items()}
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    source.train()(torch.randn(5, 3))  # moves the BatchNorm running statistics
    ema.update(source)
    for name, p in source.named_parameters():
        expected = 0.9 * before[name] + 0.1 * p.detach()
        torch.testing.assert_close(ema.shadow.get_parameter(name), expected, rtol=1e-6, atol=1e-7)
    for name, b in source.named_buffers():
        assert torch.equal(ema.shadow.get_buffer(name), b), f"buffer {name} is copied"
    ema.train()
    assert not ema.shadow.training, "the shadow gives targets: always in eval mode"
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        EMA(source, decay=1.0)


def _ema_in_layouts(rank: int, port: int) -> None:
    """A rank of the test below: the EMA formula with FSDP's sharded parameters on either side."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))

        def net(seed: int, sharded: bool) -> torch.nn.Module:
            torch.manual_seed(seed)
            m = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Linear(6, 2))
            return fully_shard(m, mesh=mesh) if sharded else m

        def whole(m: torch.nn.Module) -> dict[str, torch.Tensor]:
            return {
                n: p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
                for n, p in m.named_parameters()
            }

        for source_sharded, shadow_sharded in [(True, True), (True, False), (False, True)]:
            source = net(1, source_sharded)
            ema = EMA(net(0, False), decay=0.75)
            if shadow_sharded:
                fully_shard(ema.shadow, mesh=mesh)
            before = whole(ema.shadow)
            ema.update(source)
            after, target = whole(ema.shadow), whole(source)
            for name in before:
                expected = 0.75 * before[name] + 0.25 * target[name]
                torch.testing.assert_close(after[name], expected, rtol=1e-6, atol=1e-7, msg=name)
            assert all(hasattr(p, "full_tensor") is shadow_sharded for p in ema.shadow.parameters())
        dist.barrier()  # no rank tears the group down while another's last collective is in flight
    finally:
        dist.destroy_process_group()


def test_ema_update_follows_a_sharded_source_and_keeps_the_shadow_s_layout():
    """Two gloo ranks: a sharded source with a sharded or a whole shadow, a whole source with a
    sharded shadow (FSDP shards momentum copies as their sources, a locked tower's copy may differ)."""
    import torch.multiprocessing as mp

    from test_fsdp import _free_port

    mp.spawn(_ema_in_layouts, args=(_free_port(),), nprocs=2, join=True)


# ----------------------------------------------------------------------------------------- queue


def test_queue_is_fifo_and_keeps_the_last_k_rows():
    q = FeatureQueue(5, 2)
    rows = torch.arange(16.0).view(8, 2)
    assert q.contents()[0].shape == (0, 2)
    q.push(rows[:3], -rows[:3])
    assert torch.equal(q.contents()[0], rows[:3]) and torch.equal(q.contents()[1], -rows[:3])
    q.push(rows[3:6], -rows[3:6])  # wraps: the oldest row leaves
    assert torch.equal(q.contents()[0], rows[1:6])
    q.push(rows[6:8], -rows[6:8])
    assert torch.equal(q.contents()[0], rows[3:8]) and torch.equal(q.contents()[1], -rows[3:8])
    big = torch.arange(14.0).view(7, 2)
    q.push(big, big)  # more rows than K: the last K stay, in order
    assert torch.equal(q.contents()[0], big[2:])


# ------------------------------------------------------------------------------- losses vs brute


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def brute_itc(a, b, am, bm, qa, qb, s, alpha):
    """ALBEF's ITC, row by row in Python floats: positives on the diagonal of the momentum part,
    every queue row a negative."""
    a, b, am, bm, qa, qb = (t.double().tolist() for t in (a, b, am, bm, qa, qb))
    dot = lambda u, v: sum(x * y for x, y in zip(u, v, strict=True))  # noqa: E731
    total = 0.0
    for online, anchors_m, bank in ((a, am, bm + qb), (b, bm, am + qa)):
        loss = 0.0
        for i in range(len(online)):
            p = _softmax([s * dot(online[i], col) for col in bank])
            q = _softmax([s * dot(anchors_m[i], col) for col in bank])
            hard = -math.log(p[i])
            kl = sum(qj * (math.log(qj) - math.log(pj)) for qj, pj in zip(q, p, strict=True))
            loss += (1 - alpha) * hard + alpha * kl
        total += 0.5 * loss / len(online)
    return total


@pytest.mark.parametrize(("K", "alpha"), [(0, 0.0), (0, 0.4), (7, 0.0), (7, 0.4)])
def test_itc_with_queue_and_distillation_equals_brute_force(K, alpha):
    torch.manual_seed(K)
    n = lambda *s: F.normalize(torch.randn(*s), dim=-1)  # noqa: E731
    a, b, am, bm, qa, qb = n(4, 6), n(4, 6), n(4, 6), n(4, 6), n(K, 6), n(K, 6)
    scale = torch.tensor(5.0)
    loss, kl = itc_loss(a, b, am, bm, qa, qb, scale, alpha)
    assert loss.item() == pytest.approx(brute_itc(a, b, am, bm, qa, qb, 5.0, alpha), rel=1e-5)
    if alpha == 0:
        assert kl.item() == 0
    # the momentum model in full agreement: the KL part vanishes
    same, kl0 = itc_loss(a, b, a, b, qa, qb, scale, alpha)
    assert kl0.item() == pytest.approx(0.0, abs=1e-6)


def test_mlm_distillation_equals_brute_force():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 6)
    tokens = torch.randn(2, 3, 4)
    labels = torch.tensor([[IGNORE, 2, 5], [1, IGNORE, IGNORE]])
    blocked = torch.tensor([True, False, False, False, False, False])  # id 0 is never predicted
    soft = torch.softmax(torch.randn(3, 6).masked_fill(blocked, float("-inf")), dim=-1)
    loss, _ = mlm_loss(head, tokens, labels, blocked, soft, alpha=0.3)
    with torch.no_grad():
        logits = head(tokens).double()
    total, n = 0.0, 0
    for (i, j), q in zip(((0, 1), (0, 2), (1, 0)), soft.double(), strict=True):
        row = logits[i, j].tolist()
        words = [k for k in range(6) if not blocked[k]]
        logz = math.log(sum(math.exp(row[k]) for k in words))
        logp = {k: row[k] - logz for k in words}
        ce = -logp[int(labels[i, j])]
        kl = sum(float(q[k]) * (math.log(float(q[k])) - logp[k]) for k in words)
        total += 0.7 * ce + 0.3 * kl
        n += 1
    assert loss.item() == pytest.approx(total / n, rel=1e-5)


# ------------------------------------------------------------------------------ in the objective


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    source = world(["image", "text"])
    transforms = transforms_for(["image", "text"], source, tmp_path_factory.mktemp("momentum"))
    return transforms, tiny_batch(source, transforms, size=6, missing="image")


def albef_task(transforms, **itc):
    torch.manual_seed(0)
    model = tiny_model(transforms, fusion=tiny_fusion("image", "text", "cross"))
    specs = [
        ObjectiveSpec(name="itc", queue_size=5, **itc),
        ObjectiveSpec(name="itm"),
        ObjectiveSpec(name="mlm", alpha=0.4, mask_prob=0.3),
    ]
    return Task.from_specs(model, specs, transforms)


def test_one_momentum_copy_out_of_the_optimizer_following_the_model(setup):
    transforms, batch = setup
    task = albef_task(transforms).train()
    itc, mlm = task.objectives[0], task.objectives[2]
    assert mlm.momentum is itc.momentum and itc.owns_momentum and not mlm.owns_momentum
    keys = list(task.state_dict())
    assert any(k.startswith("objectives.0.momentum.shadow.fusion.") for k in keys)
    assert not any(k.startswith("objectives.2.momentum.") for k in keys), "the shared copy is saved once"
    assert any(k.startswith("objectives.2.head_momentum.shadow.head.") for k in keys)
    optimized = {id(p) for g in build_optimizer(task, TrainConfig()).param_groups for p in g["params"]}
    assert not any(id(p) in optimized for p in itc.momentum.parameters())
    assert not any(id(p) in optimized for p in mlm.head_momentum.parameters())

    out = task(batch)
    assert {"itc_loss", "mlm_loss", "itm_loss", "itc/kl"} <= set(out)
    assert out["itc/kl"].item() == pytest.approx(0.0, abs=1e-5), "at the start the copy is the model"
    assert int(itc.queue.count) == 3, "the three pairs of the batch (one in two lacks its image)"
    out["loss"].backward()
    name = next(n for n, _ in task.model.named_parameters() if n.startswith("towers.text."))
    shadow_before = itc.momentum.shadow.get_parameter(name).clone()
    with torch.no_grad():
        for p in task.parameters():
            if p.requires_grad and p.grad is not None:
                p.sub_(0.1 * p.grad.sign())
    task.after_step(1)
    expected = 0.995 * shadow_before + 0.005 * task.model.get_parameter(name)
    torch.testing.assert_close(itc.momentum.shadow.get_parameter(name), expected)
    out = task(batch)  # now the queue's 3 rows are negatives, and the copy lags the model
    assert out["itc/kl"].item() > 0 and int(itc.queue.count) == 5


def test_objectives_sharing_the_copy_must_agree_on_its_decay(setup):
    transforms, _ = setup
    with pytest.raises(ConfigError, match="different decays"):
        albef_task(transforms, momentum=0.9)


# ----------------------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_resume_with_momentum_and_queues_equals_an_uninterrupted_run(tmp_path):
    recipe = load_recipe(
        "albef",
        [
            "data.train.size=64",
            "data.eval={}",
            "eval.evaluators=[]",
            "data.batch_size=8",
            "train.steps=5",
            "train.checkpoint_every=2",
            "objectives.0.queue_size=12",
        ],
        smoke=True,
    )
    assert [o.name for o in recipe.objectives] == ["itc", "itm", "mlm"]
    train(recipe, tmp_path / "full", progress=False)
    train(recipe, tmp_path / "cut", progress=False, stop_after=3)  # killed after step 3
    train(None, tmp_path / "cut", resume=True, progress=False)
    a = load_weights(latest_checkpoint(tmp_path / "full"))
    b = load_weights(latest_checkpoint(tmp_path / "cut"))
    assert a.keys() == b.keys()
    assert int(a["objectives.0.queue.count"]) == 12
    assert any(k.startswith("objectives.0.momentum.shadow.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
