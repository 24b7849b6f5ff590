"""Resumable packing (issue #15): `coalign data pack` interrupted (an exception mid-shard, or a
SIGKILL of the process) and run again continues from its last durable shard, redoes a shard that
no longer matches its record, and ends with the same bytes as an uninterrupted pack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coalign.cli import main
from coalign.data.pack import STATE, pack
from coalign.data.shards import MANIFEST
from coalign.data.sources.base import SampleError, Source
from coalign.registry import SOURCES

SPEC = {"source": "world", "size": 20, "image_size": 16}
BAD = {3, 9, 15}  # samples that do not read: their skips must carry across a resume


class Flaky(Source):
    """The world, with BAD samples unreadable and, optionally, a KeyboardInterrupt at one index."""

    def __init__(self, stop_at: int | None = None):
        self.world = SOURCES.create("world", size=20, image_size=16)
        self.stop_at = stop_at

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, index: int):
        if index == self.stop_at:
            raise KeyboardInterrupt
        if index in BAD:
            raise SampleError("corrupt_image", f"sample {index}")
        return self.world[index]

    def zero_shot_tasks(self):
        return self.world.zero_shot_tasks()


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".tar"}


def drop_times(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in ("seconds", "resumed_shards")}


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("whole") / "out"
    return out, pack(Flaky(), out, shard_size=4, progress=False, spec=SPEC)


def test_interrupted_pack_continues_to_the_same_bytes(whole, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        pack(Flaky(stop_at=13), out, shard_size=4, progress=False, spec=SPEC)
    # Shards 0 (samples 0, 1, 2, 4) and 1 (5-8) are whole; the one being written (10-12) was
    # dropped; there is no manifest, so no reader takes the folder for a whole set.
    state = json.loads((out / STATE).read_text())
    assert [s["name"] for s in state["shards"]] == ["000000.tar", "000001.tar"]
    assert state["shards"][-1]["skipped"]["counts"] == {"corrupt_image": 2}
    assert sorted(p.name for p in out.iterdir()) == ["000000.tar", "000001.tar", STATE]
    before = contents(out)
    # The same command again (here through the CLI, with the source it names) continues.
    assert main(["data", "pack", json.dumps(SPEC), str(out), "--shard-size", "4", "--no-progress"]) == 0
    assert "resumed after 2 finished shards" in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    full_out, full = whole
    assert manifest["resumed_shards"] == 2 and not (out / STATE).exists()
    # The world has no bad samples (the CLI packs the plain world): the skips before the
    # interruption are the ones the manifest keeps, with their rows.
    assert manifest["skipped"] == {"counts": {"corrupt_image": 2}, "rows": {"corrupt_image": [3, 9]}}
    assert contents(out)["000000.tar"] == before["000000.tar"] == contents(full_out)["000000.tar"]
    assert [s["samples"] for s in manifest["shards"]] == [4, 4, 4, 4, 2]


def test_a_damaged_or_missing_shard_is_redone(whole, tmp_path):
    full_out, full = whole
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        pack(Flaky(stop_at=18), out, shard_size=4, progress=False, spec=SPEC)
    assert len(json.loads((out / STATE).read_text())["shards"]) == 3
    with open(out / "000001.tar", "r+b") as f:  # shard 1 cut short: it and everything after it is redone
        f.truncate(1000)
    (out / ".000003.tar.tmp").write_bytes(b"half a shard left by a kill")
    manifest = pack(Flaky(), out, shard_size=4, progress=False, spec=SPEC)
    assert manifest["resumed_shards"] == 1
    assert contents(out) == contents(full_out) and drop_times(manifest) == drop_times(full)
    assert sorted(p.name for p in out.iterdir()) == [*sorted(contents(full_out)), MANIFEST]


@pytest.mark.slow
def test_a_killed_process_resumes(whole, tmp_path):
    """SIGKILL (no cleanup at all) while packing, then the pack again: the same bytes."""
    full_out, full = whole
    out = tmp_path / "out"
    script = (
        "import sys, time; sys.path.insert(0, sys.argv[2]);"
        "from test_pack_resume import Flaky, SPEC; from coalign.data.pack import pack\n"
        "class Slow(Flaky):\n"
        "    def __getitem__(self, i):\n"
        "        time.sleep(0.3); return super().__getitem__(i)\n"
        "pack(Slow(), sys.argv[1], shard_size=4, progress=False, spec=SPEC)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script, str(out), str(Path(__file__).parent)], env=env)
    deadline = time.monotonic() + 600  # a loaded machine takes long to import torch
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads((out / STATE).read_text())["shards"]:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    assert proc.poll() is None, "the pack finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / MANIFEST).exists()
    manifest = pack(Flaky(), out, shard_size=4, progress=False, spec=SPEC)
    assert manifest["resumed_shards"] >= 1
    assert contents(out) == contents(full_out) and drop_times(manifest) == drop_times(full)


def test_refuses_a_finished_pack_or_other_settings(whole, tmp_path):
    full_out, _ = whole
    with pytest.raises(FileExistsError, match="not an empty folder"):
        pack(Flaky(), full_out, shard_size=4, progress=False, spec=SPEC)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        pack(Flaky(stop_at=10), out, shard_size=4, progress=False, spec=SPEC)
    with pytest.raises(
        FileExistsError, match=r"interrupted pack of something else \(shard_size: 4 there, 5 now\)"
    ):
        pack(Flaky(), out, shard_size=5, progress=False, spec=SPEC)
    (out / MANIFEST).write_text("{}")
    with pytest.raises(FileExistsError, match="finished pack"):
        pack(Flaky(), out, shard_size=4, progress=False, spec=SPEC)
