"""FSDP2 (`train.fsdp: true`, train/fsdp.py) with two real gloo processes on this machine.

One pair of processes runs, in turn: an FSDP run, its resume from a mid-run checkpoint, an FSDP run
with GradCache (train.accumulate=2) and one in bf16. Each is checked against a plain one-process
run on the same global batches: equal weights after every step taken (to float32 rounding) for the
fp32 runs, close for bf16; the FSDP checkpoint then resumes in one process (plain layout) to the
same weights, and loads for evaluation.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from coalign.checkpoint import LATEST, latest_checkpoint, load_weights
from coalign.config import load_recipe

pytestmark = pytest.mark.slow

BASE = [
    "data.train.size=96",
    "data.eval.heldout_samples.size=24",
    "data.eval.heldout_combos.size=24",
    "eval.evaluators=[]",
    "train.threads=1",
    "train.precision=fp32",  # bf16 rounds differently at different batch shapes
    "model.towers.image.stem=patch",  # no BatchNorm: the CPU has no SyncBatchNorm
    "train.steps=4",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=2",
]


def _recipe(*extra: str):
    return load_recipe("demo", [*BASE, *extra], smoke=True)


def _cut_at(run: Path, copy: Path, step: int) -> None:
    """`copy`: the run as a kill right after its checkpoint at `step` would have left it."""
    shutil.copytree(run, copy)
    for ckpt in (copy / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    (copy / "checkpoints" / LATEST).write_text(f"step_{step:08d}")


def _worker(rank: int, root: str, port: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from coalign.train.loop import train

    out = Path(root)
    try:
        with open(out / f"log{rank}.txt", "w") as log, contextlib.redirect_stdout(log):
            train(_recipe("train.fsdp=true"), out / "fsdp", progress=False)
        if rank == 0:
            _cut_at(out / "fsdp", out / "cut", 2)
            _cut_at(out / "fsdp", out / "cut1", 2)  # resumed by one process, in the test
        dist.barrier()
        train(None, out / "cut", resume=True, progress=False)
        train(_recipe("train.fsdp=true", "train.accumulate=2"), out / "gradcache", progress=False)
        train(_recipe("train.fsdp=true", "train.precision=bf16"), out / "bf16", progress=False)
        dist.barrier()  # no rank tears the group down while another's last collective is in flight
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_weights(latest_checkpoint(run))


def _assert_same(a: Path, b: Path, atol: float = 1e-5) -> None:
    assert latest_checkpoint(a).name == latest_checkpoint(b).name
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert wa[key].shape == wb[key].shape, key  # 0-d parameters stay 0-d
        torch.testing.assert_close(wb[key], wa[key], atol=atol, rtol=0, msg=key)


def test_fsdp_trains_like_one_process_resumes_exactly_and_loads_plainly(tmp_path):
    from coalign.build import load_run
    from coalign.train.loop import train

    mp.spawn(_worker, args=(str(tmp_path), _free_port()), nprocs=2, join=True)
    train(_recipe(), tmp_path / "one", progress=False)
    assert "coalign: FSDP: " in (tmp_path / "log0.txt").read_text()  # it did shard

    _assert_same(tmp_path / "one", tmp_path / "fsdp")
    _assert_same(tmp_path / "one", tmp_path / "cut")  # FSDP resumed with FSDP
    _assert_same(tmp_path / "one", tmp_path / "gradcache")
    # bf16 autocast: other rounding, so close rather than equal (well within the distance the
    # weights travelled from step 2 to step 4)
    fp32, bf16 = _weights(tmp_path / "fsdp"), _weights(tmp_path / "bf16")
    at_2 = load_weights(tmp_path / "fsdp" / "checkpoints" / "step_00000002")
    assert bf16.keys() == fp32.keys()
    off = torch.cat([(bf16[k] - fp32[k]).abs().flatten() for k in fp32]).mean()
    travel = torch.cat([(fp32[k] - at_2[k]).abs().flatten() for k in fp32]).mean()
    print(f"bf16 vs fp32 mean |diff| {off:.2e}, travelled {travel:.2e}")
    assert torch.isfinite(off) and off < 0.5 * travel

    # the FSDP checkpoint (step 2) resumed by one plain process: the optimizer state is one
    # process's layout, so the run continues exactly
    train(None, tmp_path / "cut1", resume=True, progress=False)
    _assert_same(tmp_path / "one", tmp_path / "cut1")

    run = load_run(tmp_path / "fsdp")  # what `coalign eval` and serving read
    ref = load_run(tmp_path / "one")
    tower = ref.model.towers["text"]
    ids = type(tower).example_input(tower.cfg)
    with torch.no_grad():
        torch.testing.assert_close(
            run.model.encode("text", ids), ref.model.encode("text", ids), atol=1e-5, rtol=0
        )
