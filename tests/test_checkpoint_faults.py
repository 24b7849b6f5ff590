"""Damaged checkpoints, leftovers of a kill, and folders coalign must not touch (issue #10.1, #10.5).

A truncated weights or state file in the newest checkpoint must not stop a resume: the newest intact
checkpoint is used, with a warning that names both. `coalign eval` gives the same fallback, or a
one-line error when nothing intact is left.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from coalign.build import load_run
from coalign.checkpoint import (
    MANIFEST,
    STATE,
    WEIGHTS,
    CheckpointError,
    checkpoint_step,
    checkpoints,
    clean_partial,
    damage,
    latest_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from coalign.cli import main
from coalign.train.loop import train
from coalign.train.session import DEMO_MARKER


def _truncate(path) -> None:
    """What a full disk or an interrupted copy leaves: the first half of the file."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _three_checkpoints(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"w": torch.full((4,), float(step))}, {"x": step}, keep=3)
    return checkpoints(tmp_path)


@pytest.mark.parametrize("name", [WEIGHTS, STATE])
def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path, caplog, name):
    *_, previous, latest = _three_checkpoints(tmp_path)
    _truncate(latest / name)
    assert damage(latest) is not None and damage(previous) is None
    with caplog.at_level(logging.WARNING, logger="coalign"):
        assert latest_checkpoint(tmp_path) == previous
    (message,) = [r.getMessage() for r in caplog.records]
    assert latest.name in message and previous.name in message and name in message


def test_a_flipped_byte_of_the_same_size_is_caught_by_the_checksum(tmp_path):
    *_, latest = _three_checkpoints(tmp_path)
    data = bytearray((latest / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (latest / WEIGHTS).write_bytes(bytes(data))
    assert "checksum" in damage(latest)
    assert latest_checkpoint(tmp_path).name == "step_00000002"


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path):
    for path in _three_checkpoints(tmp_path):
        _truncate(path / WEIGHTS)
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
        latest_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="damaged"):
        resolve_checkpoint(tmp_path / "checkpoints" / "step_00000003")


def test_the_step_comes_from_the_checkpoint_not_its_folder_name(tmp_path):
    (path,) = _three_checkpoints(tmp_path)[-1:]
    renamed = path.rename(tmp_path / "my-favourite")
    assert checkpoint_step(renamed) == 3
    assert json.loads((renamed / MANIFEST).read_text())["step"] == 3


def test_leftovers_of_a_killed_save_are_removed_and_nothing_else(tmp_path):
    _three_checkpoints(tmp_path)
    root = tmp_path / "checkpoints"
    (root / ".step_00000004.abc123").mkdir()
    (root / ".step_00000004.abc123" / WEIGHTS).write_bytes(b"x" * 10)
    (root / ".LATEST.q1w2e3").write_text("step_00000004")
    (root / "notes.txt").write_text("mine")
    removed = clean_partial(tmp_path)
    assert sorted(p.name for p in removed) == [".LATEST.q1w2e3", ".step_00000004.abc123"]
    assert sorted(p.name for p in root.iterdir()) == [
        "LATEST",
        "notes.txt",
        "step_00000001",
        "step_00000002",
        "step_00000003",
    ]


@pytest.mark.slow
def test_resume_and_eval_survive_a_damaged_latest_checkpoint(tmp_path, tiny_recipe, capsys, caplog):
    recipe = tiny_recipe("train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=3")
    run_dir = tmp_path / "run"
    train(recipe, run_dir, progress=False, stop_after=4)  # "killed" after step 4
    _truncate(run_dir / "checkpoints" / "step_00000004" / WEIGHTS)
    (run_dir / "checkpoints" / ".step_00000005.zzz").mkdir()  # a save the kill interrupted

    # eval: falls back to step 2 with a warning, exit 0
    with caplog.at_level(logging.WARNING, logger="coalign"):
        assert main(["eval", str(run_dir), "--out", str(tmp_path / "eval.json")]) == 0
    assert any(
        "step_00000004" in r.getMessage() and "step_00000002" in r.getMessage() for r in caplog.records
    )
    assert json.loads((tmp_path / "eval.json").read_text())["step"] == 2
    capsys.readouterr()
    # eval of the damaged checkpoint itself: one line, no traceback
    assert main(["eval", str(run_dir / "checkpoints" / "step_00000004")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("coalign eval: error: checkpoint") and "damaged" in err[0]

    resumed = train(None, run_dir, resume=True, progress=False)
    assert resumed.step == 6
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert train_steps == sorted(set(train_steps))  # steps 3-4 replayed, not logged twice
    assert not (run_dir / "checkpoints" / ".step_00000005.zzz").exists()


@pytest.mark.slow
def test_resume_says_where_it_continues_from(tmp_path, tiny_recipe, capfd):
    recipe = tiny_recipe("train.steps=4", "train.checkpoint_every=2")
    run_dir = tmp_path / "run"
    train(recipe, run_dir, progress=False, stop_after=2)
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert "resuming from step 2" in "".join(capfd.readouterr())


@pytest.mark.slow
def test_resume_without_any_checkpoint_says_so(tmp_path, tiny_recipe, capfd):
    recipe = tiny_recipe("train.steps=3", "train.checkpoint_every=10")
    run_dir = tmp_path / "run"
    train(recipe, run_dir, progress=False, stop_after=2)  # killed before its first checkpoint
    for path in checkpoints(run_dir):
        import shutil

        shutil.rmtree(path)
    (run_dir / "checkpoints" / "LATEST").unlink(missing_ok=True)
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert "no checkpoint left: starting again from step 0" in "".join(capfd.readouterr())
    assert load_run(run_dir).step == 3


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "thesis.txt").write_text("three years of work")
    assert main(["demo", "--out", str(mine), "--smoke"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was not made by `coalign demo`" in err[0]
    assert (mine / "thesis.txt").read_text() == "three years of work"


def test_train_refuses_a_non_empty_folder_that_is_not_a_run(tmp_path, tiny_recipe):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "recipe-ideas.md").write_text("try siglip")
    with pytest.raises(FileExistsError, match="not empty"):
        train(tiny_recipe("train.steps=1"), mine, progress=False)
    assert [p.name for p in mine.iterdir()] == ["recipe-ideas.md"]


@pytest.mark.slow
def test_demo_replaces_only_its_own_folder(tmp_path):
    out = tmp_path / "demo"
    overrides = ["train.steps=2", "data.train.size=64", "data.eval.heldout_samples.size=16"]
    overrides.append("data.eval.heldout_combos.size=16")
    assert main(["demo", "--out", str(out), "--smoke", *overrides]) == 0
    assert (out / DEMO_MARKER).is_file() and latest_checkpoint(out).name == "step_00000002"
    (out / "stale").write_text("from the last demo")
    assert main(["demo", "--out", str(out), "--smoke", *overrides]) == 0
    assert not (out / "stale").exists()


@pytest.mark.slow
def test_a_batch_of_one_still_steps_the_schedule_and_writes_the_last_checkpoint(tmp_path, tiny_recipe):
    # 33 samples, batch 16: step 3 sees one sample of epoch 0... the loader wraps epochs, so force a
    # one-sample batch through a source where all but one sample of a batch are unusable instead.
    from coalign.train import loop

    recipe = tiny_recipe("train.steps=3", "train.checkpoint_every=10", "data.batch_size=16")
    real = loop.train_batches

    def batches(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 2:  # the last step's batch keeps one sample
                batch = {**batch, "id": batch["id"][:1]}
                batch = {k: (v[:1] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                batch["present"] = {k: v[:1] for k, v in batch["present"].items()}
                batch["label"] = {k: v[:1] for k, v in batch["label"].items()}
            yield batch

    loop.train_batches = batches
    try:
        result = train(recipe, tmp_path / "run", progress=False)
    finally:
        loop.train_batches = real
    assert result.step == 3 and result.skipped["small_batch"] == 1
    assert latest_checkpoint(tmp_path / "run").name == "step_00000003"
    state = torch.load(latest_checkpoint(tmp_path / "run") / STATE, weights_only=False)
    assert state["scheduler"]["last_epoch"] == 3  # the schedule advanced on the skipped step too


def test_an_out_folder_that_cannot_be_written_is_a_one_line_error(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "file").write_text("x")
    target = (
        locked / "file" / "run"
    )  # a path through a file: NotADirectoryError, as a read-only disk would be
    assert main(["train", "demo", "--smoke", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("coalign train: error:")
