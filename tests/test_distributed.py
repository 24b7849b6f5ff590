"""Distributed training with two real gloo processes on this machine, and GradCache (issue #14).

- every objective: the loss and gradients of a 2-process step on a global batch equal those of one
  process on the same batch (the gathered features carry their gradient back, summed; objectives
  with a local-loss form compute only their rank's rows, test_local_loss.py checks that arithmetic);
- GradCache: K micro-batches give the gradient of the whole batch, for every objective;
- `coalign train --nproc 2` ends with the weights of a 1-process run on the same global batches, and
  a 2-process run killed mid-way resumes (with 2 processes or with 1) to the same weights;
- killing one rank ends the run with an error instead of a hang.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from coalign.checkpoint import latest_checkpoint, load_weights
from coalign.data.collate import split_batch
from coalign.objectives.task import Task
from coalign.registry import OBJECTIVES
from coalign.runtime import Runtime
from coalign.train.distributed import Dist, average_gradients
from coalign.train.loop import forward_backward
from test_registries import needs_teacher, objective_setup

pytestmark = pytest.mark.slow


def _grads(modules) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{n}": p.grad.clone()
        for i, m in enumerate(modules)
        for n, p in m.named_parameters()
        if p.grad is not None
    }


def _assert_close(got: torch.Tensor, expected: torch.Tensor, msg: str) -> None:
    """Equal to float32 rounding: sums taken in another order differ in their last digits, so the
    tolerance scales with the tensor's largest entry."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=1e-4, msg=msg)


def _reference(objective, model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """The single-process loss and gradients on the whole batch (no gather: called before, or
    outside, any process group)."""
    torch.manual_seed(1)  # objectives that draw (Symile's negatives) draw the same in every setting
    out = objective(model(batch), batch)
    loss = sum(v for k, v in out.items() if k.endswith("_loss"))
    loss.backward()
    grads = _grads([model, objective])
    model.zero_grad(set_to_none=True)
    objective.zero_grad(set_to_none=True)
    return float(loss), grads


def _setup(name: str, folder: Path, teacher: str | None, lacking=None):
    torch.manual_seed(0)
    objective, model, batch = objective_setup(name, folder, teacher=teacher, lacking=lacking)
    # BatchNorm (point encoders, SLIP's projection MLP) with running statistics: per sample, so
    # independent of the split. In training mode it normalises per rank on the CPU (no SyncBatchNorm),
    # the one documented difference from a single process.
    model.eval()
    objective.eval()
    return objective, model, batch


def objectives_on_rank(rank: int, names: list[str], root: str, teacher: str | None = None, lacking=None):
    """(name, objective, model, batch) for each name, inside a 2-rank gloo group torn down at the end."""
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        for name in names:
            folder = Path(root) / f"{name}-{rank}"
            folder.mkdir()
            yield (name, *_setup(name, folder, teacher, lacking))
        dist.barrier()  # no rank tears the group down while another's last collective is in flight
    finally:
        dist.destroy_process_group()


def _worker(rank: int, names: list[str], root: str, teacher: str | None, lacking=None) -> None:
    for name, objective, model, batch in objectives_on_rank(rank, names, root, teacher, lacking):
        expected_loss, expected = _reference(objective, model, batch)
        task = Task(model, [objective], [1.0])
        part = split_batch(batch, 2)[rank]
        torch.manual_seed(1)
        out = task.loss(model(part), part)
        assert abs(out["loss"].item() - expected_loss) < 1e-5, (name, out["loss"].item(), expected_loss)
        out["loss"].backward()
        average_gradients(task, Dist(rank, 2))
        got = _grads([model, objective])
        assert got.keys() == expected.keys(), (name, sorted(set(got) ^ set(expected)))
        for key in expected:
            _assert_close(got[key], expected[key], f"{name} {key}")


def test_every_objective_gets_the_single_process_gradient_from_two_processes(tmp_path, request):
    names = OBJECTIVES.names()
    teacher = str(request.getfixturevalue("teacher")) if any(needs_teacher(n) for n in names) else None
    mp.spawn(_worker, args=(names, str(tmp_path), teacher), nprocs=2, join=True)


def test_a_rank_with_no_rows_of_a_modality_still_gets_the_single_process_gradient(tmp_path, request):
    """The batch's second half (rank 1's) lacks the objective's last modality entirely: rank 1 has
    no features of it, and the objectives still give the single-process loss and gradients (those
    that gather see the other rank's rows; SigLIP's ring runs with zero rows of its own)."""
    names = OBJECTIVES.names()
    teacher = str(request.getfixturevalue("teacher")) if any(needs_teacher(n) for n in names) else None
    mp.spawn(_worker, args=(names, str(tmp_path), teacher, (3, 4, 5)), nprocs=2, join=True)


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_gradcache_gives_the_whole_batch_gradient(name, tmp_path, request):
    teacher = str(request.getfixturevalue("teacher")) if needs_teacher(name) else None
    objective, model, batch = _setup(name, tmp_path, teacher)
    task = Task(model, [objective], [1.0])
    rt = Runtime.cpu()
    results = []
    for k in (1, 3):
        torch.manual_seed(1)
        out = forward_backward(task, batch, k, rt)
        results.append((out["loss"].item(), _grads([task])))
        task.zero_grad(set_to_none=True)
    (loss1, g1), (loss3, g3) = results
    assert abs(loss1 - loss3) < 1e-5
    assert g1.keys() == g3.keys()
    for key in g1:
        _assert_close(g3[key], g1[key], key)


# ------------------------------------------------------------------------------ whole runs, by the CLI

RUN = [
    "data.train.size=96",
    "data.eval.heldout_samples.size=24",
    "data.eval.heldout_combos.size=24",
    "eval.evaluators=[]",
    "train.threads=1",
    "train.precision=fp32",  # bf16 rounds differently at different batch shapes
    "model.towers.image.stem=patch",  # no BatchNorm: the CPU has no SyncBatchNorm
]


def _train(out: Path, *extra: str, nproc: int = 1, resume: bool = False, wait: bool = True):
    cmd = [sys.executable, "-m", "coalign", "train"]
    cmd += ["--resume", str(out)] if resume else ["demo", *RUN, *extra, "--smoke", "--out", str(out)]
    cmd += ["--no-progress", "--nproc", str(nproc)]
    if not wait:
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = load_weights(latest_checkpoint(a)), load_weights(latest_checkpoint(b))
    assert latest_checkpoint(a).name == latest_checkpoint(b).name
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=0, msg=key)


def test_two_processes_train_like_one_and_resume_exactly(tmp_path):
    steps = ["train.steps=8", "train.checkpoint_every=2"]
    _train(tmp_path / "one", *steps)
    _train(tmp_path / "two", *steps, nproc=2)
    _assert_same_weights(tmp_path / "one", tmp_path / "two")

    # Killed after its checkpoint at step 4, then resumed with 2 processes and with 1.
    proc = _train(tmp_path / "cut", *steps, nproc=2, wait=False)
    deadline = time.monotonic() + 120
    while not (tmp_path / "cut" / "checkpoints" / "step_00000004").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.01)
    _kill_all(proc)
    import shutil

    shutil.copytree(tmp_path / "cut", tmp_path / "cut1")
    out = _train(tmp_path / "cut", nproc=2, resume=True).stdout
    assert "resuming from step" in out
    _assert_same_weights(tmp_path / "one", tmp_path / "cut")
    _train(tmp_path / "cut1", nproc=1, resume=True)
    _assert_same_weights(tmp_path / "one", tmp_path / "cut1")


def test_killing_one_rank_stops_the_run_instead_of_hanging(tmp_path):
    proc = _train(tmp_path / "run", "train.steps=100000", "train.checkpoint_every=1000", nproc=2, wait=False)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "metrics.jsonl").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    time.sleep(1.0)
    workers = _children_running_coalign(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    try:
        out, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the other rank hung after its peer was killed")
    assert proc.returncode != 0
    assert "SIGKILL" in out or "Signal 9" in out or "failed" in out.lower(), out[-2000:]


def _kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL `coalign train --nproc N` and every rank under it, and wait until none runs: a rank
    outside the launcher's process group could otherwise still be renaming a checkpoint into place
    while the test copies the folder."""
    ranks = _children_running_coalign(proc.pid)  # before the launcher dies: found by ancestry
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 60
    while any(_running(pid) for pid in ranks):
        assert time.monotonic() < deadline, f"ranks {ranks} outlived SIGKILL"
        time.sleep(0.01)


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (a killed rank waiting to be reaped runs no code)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children_running_coalign(pid: int) -> list[int]:
    """The worker processes under `pid` (torchrun's children that run coalign), oldest first."""
    found = []
    for entry in sorted(Path("/proc").iterdir(), key=lambda p: p.name):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ppid = int(stat[1])
        if b"coalign" in cmdline and ppid != pid and _descends_from(ppid, pid):
            found.append(int(entry.name))
    return sorted(found)


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


def test_compiled_towers_train_and_keep_their_checkpoint_keys(tmp_path, tiny_recipe):
    from coalign.train.loop import train

    plain = train(tiny_recipe("train.steps=1", "eval.evaluators=[]"), tmp_path / "plain", progress=False)
    compiled = train(
        tiny_recipe("train.steps=1", "eval.evaluators=[]", "train.compile=true"),
        tmp_path / "compiled",
        progress=False,
    )
    assert compiled.step == plain.step == 1
    a, b = (
        load_weights(latest_checkpoint(tmp_path / "plain")),
        load_weights(latest_checkpoint(tmp_path / "compiled")),
    )
    assert a.keys() == b.keys()
