"""Sharded FSDP checkpoints (`train.checkpoint_format: sharded`, train/fsdp_checkpoint.py) and
Ctrl-C under torchrun (train/interrupt.py), with two real gloo processes on this machine.

One pair of processes trains with sharded checkpoints, then resumes a copy cut at step 2; the test
then checks both against one plain process (the helpers of tests/test_fsdp.py), resumes the same
cut with ONE process (DCP reshards 2 -> 1), reads the sharded run with `load_run` and
`model.init_from`, and finds a damaged shard. A `coalign train --nproc 2` run is interrupted by a
terminal's Ctrl-C (SIGINT to its whole process group): every rank saves the step it stopped at, and
the resume continues as an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
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

from coalign.checkpoint import (
    MANIFEST,
    SHARDED,
    STATE,
    checkpoint_step,
    damage,
    is_sharded,
    latest_checkpoint,
    prune,
)
from coalign.config import InitFrom, save_resolved
from coalign.registry import ConfigError
from test_fsdp import _assert_same, _cut_at, _free_port, _recipe

SHARD = ["train.fsdp=true", "train.checkpoint_format=sharded"]


def _worker(rank: int, root: str, port: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from coalign.train.loop import train

    out = Path(root)
    try:
        train(_recipe(*SHARD), out / "sharded", progress=False)
        if rank == 0:
            for copy in ("cut", "cut1"):
                _cut_at(out / "sharded", out / copy, 2)
            # not a checkpoint of coalign's (no manifest, no state): pruning must leave it alone
            (out / "cut" / "checkpoints" / "step_00000001").mkdir()
            (out / "cut" / "checkpoints" / "step_00000001" / "notes.txt").write_text("mine")
        dist.barrier()
        train(None, out / "cut", resume=True, progress=False)
        dist.barrier()  # no rank tears the group down while another's last collective is in flight
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_checkpoints_resume_exactly_at_two_and_one_process_and_load_plainly(tmp_path):
    from coalign.build import init_from_run, load_run
    from coalign.train.loop import train

    mp.spawn(_worker, args=(str(tmp_path), _free_port()), nprocs=2, join=True)
    train(_recipe(), tmp_path / "one", progress=False)

    ckpt = latest_checkpoint(tmp_path / "sharded")
    assert is_sharded(ckpt) and not (ckpt / "weights.safetensors").exists()
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert (manifest["format"], manifest["world"], manifest["step"]) == ("sharded", 2, 4)
    # each rank wrote its own shard file; the manifest covers every file
    assert {f"{SHARDED}/__0_0.distcp", f"{SHARDED}/__1_0.distcp", f"{SHARDED}/.metadata", STATE} == set(
        manifest["files"]
    )
    _assert_same(tmp_path / "one", tmp_path / "sharded")  # load_weights reads the shards whole
    _assert_same(tmp_path / "one", tmp_path / "cut")  # 2-process sharded resume: exact
    assert (tmp_path / "cut" / "checkpoints" / "step_00000001" / "notes.txt").read_text() == "mine"
    assert [p.name for p in sorted((tmp_path / "cut" / "checkpoints").glob("step_*"))] == [
        "step_00000001",
        "step_00000002",
        "step_00000004",
    ]

    # the 2-process checkpoint resumed by one process (resharded): exact, and it goes on sharded
    train(None, tmp_path / "cut1", resume=True, progress=False)
    _assert_same(tmp_path / "one", tmp_path / "cut1")
    resumed = latest_checkpoint(tmp_path / "cut1")
    assert json.loads((resumed / MANIFEST).read_text())["world"] == 1 and is_sharded(resumed)

    # what `coalign eval`, serving and export read; and `model.init_from`
    run, ref = load_run(tmp_path / "sharded"), load_run(tmp_path / "one")
    tower = ref.model.towers["text"]
    ids = type(tower).example_input(tower.cfg)
    with torch.no_grad():
        torch.testing.assert_close(
            run.model.encode("text", ids), ref.model.encode("text", ids), atol=1e-5, rtol=0
        )
    fresh = copy.deepcopy(ref.model)  # `model.init_from: RUN` copies every tensor of the model
    assert init_from_run(fresh, InitFrom(run=str(tmp_path / "sharded")), ref.transforms) > 0
    theirs = run.model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in fresh.state_dict().items())

    # a damaged shard is found by its checksum, and the run falls back to the older checkpoint
    shard = ckpt / SHARDED / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "__1_0.distcp does not match its checksum" in damage(ckpt)
    assert checkpoint_step(latest_checkpoint(tmp_path / "sharded")) == 2


def test_pruning_deletes_only_coalign_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / MANIFEST).write_text("{}")
    (root / "step_00000000").mkdir()  # the user's, named like one
    (root / "step_best").mkdir()
    (root / "step_best" / MANIFEST).write_text("{}")
    removed = prune(tmp_path, keep=1)
    assert sorted(p.name for p in removed) == ["step_00000001", "step_00000002"]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000000", "step_00000003", "step_best"]


def test_sharded_format_needs_fsdp():
    with pytest.raises(ConfigError, match="checkpoint_format=sharded .* needs train.fsdp: true"):
        _recipe("train.checkpoint_format=sharded")


def _train_rows(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.endswith("}") and json.loads(line).get("kind") == "train")


@pytest.mark.slow
def test_ctrl_c_under_torchrun_saves_the_current_step_on_every_rank_and_resumes(tmp_path):
    from coalign.train.loop import train

    recipe = _recipe(*SHARD, "train.steps=400", "train.checkpoint_every=3", "train.log_every=1")
    save_resolved(recipe, tmp_path / "recipe.yaml")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "coalign", "train", str(tmp_path / "recipe.yaml"), "--nproc", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*cmd, "--out", str(run_dir), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        deadline = time.monotonic() + 240
        while _train_rows(run_dir) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0]
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the launcher, torchrun and both ranks
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "every rank saved its checkpoint" in out, out
    stopped = int(out.split("interrupted (")[1].split(" at step ")[1].split(":")[0])
    ckpt = latest_checkpoint(run_dir)
    assert checkpoint_step(ckpt) == stopped >= 4 and is_sharded(ckpt), out
    assert damage(ckpt) is None
    assert not any(p.name.startswith(".") for p in (run_dir / "checkpoints").iterdir())

    # the resume (one process; the shards are resharded) continues as one uninterrupted run
    train(None, run_dir, resume=True, progress=False, stop_after=stopped + 1)
    reference = tmp_path / "reference"
    train(recipe, reference, progress=False, stop_after=stopped + 1)
    _assert_same(reference, run_dir)


def test_optimizer_groups_are_matched_by_parameter_name_across_layouts():
    from coalign.checkpoint import CheckpointError
    from coalign.train.fsdp_checkpoint import _regroup

    # FSDP splits each kind into sharded and whole groups; one process has one group per kind
    saved = [
        {"lr": 0.1, "weight_decay": 0.1, "params": ["a.weight"]},
        {"lr": 0.1, "weight_decay": 0.1, "params": ["head.weight"]},
        {"lr": 0.2, "weight_decay": 0.0, "params": ["a.bias", "logit_scale"]},
    ]
    plain = [{"lr": 9, "params": ["a.weight", "head.weight"]}, {"lr": 9, "params": ["logit_scale", "a.bias"]}]
    assert _regroup(saved, plain, Path("c")) == [
        {"lr": 0.1, "weight_decay": 0.1, "params": ["a.weight", "head.weight"]},
        {"lr": 0.2, "weight_decay": 0.0, "params": ["logit_scale", "a.bias"]},
    ]
    with pytest.raises(CheckpointError, match=r"1 of its own are not in this run \(e.g. head.weight\)"):
        _regroup(saved, [{"params": ["a.weight", "a.bias", "logit_scale", "b.weight"]}], Path("c"))
    with pytest.raises(CheckpointError, match="a.weight's group changed"):
        _regroup(
            saved, [{"params": ["a.weight", "a.bias"]}, {"params": ["head.weight", "logit_scale"]}], Path("c")
        )
