"""kill -9 at random moments of a real `coalign train` process, including during checkpoint writes:
every resume continues the same run, and the final weights equal an uninterrupted run's bit for bit.

The kills are drawn from a fixed seed, so the test is the same every time; half of them wait for a
checkpoint write to be under way (its hidden temporary folder to appear) and kill right then.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from coalign.checkpoint import latest_checkpoint, load_weights
from coalign.config import save_resolved

STEPS = 60


@pytest.fixture
def recipe_file(tmp_path, tiny_recipe) -> Path:
    """The smoke demo, made longer (--smoke would cap it at 20 steps) and single-threaded (the same
    arithmetic in every process)."""
    recipe = tiny_recipe("data.batch_size=16")
    recipe.train.steps = STEPS
    recipe.train.checkpoint_every = 1
    recipe.train.log_every = 1
    recipe.train.threads = 1
    path = tmp_path / "recipe.yaml"
    save_resolved(recipe, path)
    return path


def _command(recipe: Path, run_dir: Path, resume: bool) -> list[str]:
    base = [sys.executable, "-m", "coalign", "train"]
    if resume:
        return [*base, "--resume", str(run_dir), "--no-progress"]
    return [*base, str(recipe), "--out", str(run_dir), "--no-progress"]


def _start(recipe: Path, run_dir: Path, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        _command(recipe, run_dir, resume),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Poll `predicate` (busily: a checkpoint write of this tiny model lasts milliseconds) until it
    holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
    raise TimeoutError("the training process neither reached the kill point nor ended")


def _temporaries(run_dir: Path) -> set[str]:
    try:
        return {p.name for p in os.scandir(run_dir / "checkpoints") if p.name.startswith(".step_")}
    except FileNotFoundError:
        return set()


def _log_size(run_dir: Path) -> int:
    try:
        return (run_dir / "metrics.jsonl").stat().st_size
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_weights(tmp_path, recipe_file):
    reference = tmp_path / "reference"
    done = subprocess.run(
        _command(recipe_file, reference, False), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr

    run_dir = tmp_path / "killed"
    rng = random.Random(0)
    kills, during_write, resume = 0, 0, False
    for attempt in range(24):
        proc = _start(recipe_file, run_dir, resume)
        if kills == 8:  # enough: let this one finish
            break
        at_write = attempt % 2 == 1
        # Kill points are new events of this process: leftovers of the last kill do not count.
        if at_write:
            old = _temporaries(run_dir)
            reached = _wait_for(lambda old=old: bool(_temporaries(run_dir) - old), proc)
        else:
            size = _log_size(run_dir)
            reached = _wait_for(lambda size=size: _log_size(run_dir) > size, proc)
            time.sleep(rng.uniform(0.0, 0.5))
            reached = reached and proc.poll() is None
        if not reached:  # it finished before the kill point: the run is complete
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        during_write += at_write
        resume = (run_dir / "recipe.yaml").is_file()
        if not resume:  # killed before the recipe was saved: nothing to resume, start again
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
    else:
        pytest.fail("the run never finished")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    if resume:
        assert "resuming from step" in out or "no checkpoint left" in out, out
    print(f"{kills} kills ({during_write} during a checkpoint write), {attempt + 1} processes")
    assert kills >= 6 and during_write >= 3, (kills, during_write)

    final_ref, final = latest_checkpoint(reference), latest_checkpoint(run_dir)
    assert final.name == final_ref.name == f"step_{STEPS:08d}"
    a, b = load_weights(final_ref), load_weights(final)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Nothing leaked, nothing logged twice.
    assert not any(p.name.startswith(".") for p in (run_dir / "checkpoints").iterdir())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["kind"], tuple(sorted(r))) for r in rows]  # one eval row per dataset
    assert len(keys) == len(set(keys)), sorted(k for k in set(keys) if keys.count(k) > 1)
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, STEPS + 1))
