"""Checkpoints on disk: the layout, atomic saving, verification, and finding the newest intact one.

A checkpoint is a folder `checkpoints/step_XXXXXXXX/` holding

    weights.safetensors   every tensor of the task (the model under the `model.` prefix)
    state.pt              the trainer's state: optimizer, scheduler, RNG, data position, skip counts
    checkpoint.json       the step, and each file's size and SHA-256, written last

Everything is written into a hidden temporary folder, each file fsynced, then the folder is renamed
into place and `LATEST` replaced atomically, so a crash at any moment leaves the old checkpoint or
the new one, never half of one. `checkpoint.json` lets a reader tell a checkpoint that was damaged
afterwards (a truncated copy, a full disk) from a good one; `latest_checkpoint` then falls back to
the newest intact checkpoint and says which it passed over.

A run trained with `train.checkpoint_format: sharded` (FSDP) holds `sharded/` instead of
`weights.safetensors`: a torch.distributed.checkpoint folder where each rank wrote its shards of the
weights and the optimizer state (`checkpoint_sharded.py`); the manifest lists every file of it,
and `load_weights` reads it whole in one process, so every reader takes either kind.

This module is the library's floor: evaluation, search and serving read runs through it, and the
trainer writes them through it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from coalign.io import atomic_write_text, fsync_dir, fsync_file

WEIGHTS = "weights.safetensors"
STATE = "state.pt"
MANIFEST = "checkpoint.json"
LATEST = "LATEST"
SHARDED = "sharded"  # a sharded checkpoint's torch.distributed.checkpoint folder, in place of WEIGHTS
MODEL_PREFIX = "model."  # the model's tensors inside a task's weights (the rest are objectives')
NAME = re.compile(r"step_\d{8}")  # the folders this module writes

log = logging.getLogger("coalign")


class CheckpointError(ValueError):
    """A checkpoint that is missing or damaged; the message names the folder and what is wrong."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    run_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any], keep: int
) -> Path:
    """Write checkpoints/step_XXXXXXXX atomically, point LATEST at it, keep the newest `keep`."""
    final, tmp = begin_checkpoint(run_dir, step)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
    torch.save({**state, "step": step}, tmp / STATE)
    for f in (WEIGHTS, STATE):
        fsync_file(tmp / f)
    return finish_checkpoint(tmp, final, step, {f: file_record(tmp / f) for f in (WEIGHTS, STATE)}, keep)


def begin_checkpoint(run_dir: Path, step: int) -> tuple[Path, Path]:
    """(the checkpoint folder for `step`, the hidden temporary folder to write it in)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    return final, Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))


def file_record(path: Path) -> dict[str, Any]:
    """A written file's entry in the manifest: its size and SHA-256."""
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def finish_checkpoint(
    tmp: Path, final: Path, step: int, files: dict[str, dict], keep: int, **about: Any
) -> Path:
    """Write the manifest (`files`: relative path -> file_record) last, rename `tmp` into place,
    point LATEST at it, prune to the newest `keep`. `about` adds fields to the manifest."""
    root = final.parent
    atomic_write_text(tmp / MANIFEST, json.dumps({"step": step, **about, "files": files}, indent=2))
    if final.exists():  # re-saving the same step (e.g. after an interrupt): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_text(root / LATEST, final.name)
    prune(root.parent, keep)
    return final


def prune(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; only folders this module wrote (named
    step_XXXXXXXX, holding a manifest or a state file), never anything else under checkpoints/."""
    ours = [
        p
        for p in checkpoints(run_dir)
        if NAME.fullmatch(p.name) and ((p / MANIFEST).is_file() or (p / STATE).is_file())
    ]
    for old in ours[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return ours[:-keep]


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first (hidden temporary folders are not checkpoints)."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def clean_partial(run_dir: Path) -> list[Path]:
    """Remove what a killed save left behind (`.step_*` folders, `.LATEST.*` files): only the hidden
    temporaries this module creates, never a finished checkpoint. Returns what was removed."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    leftovers = [p for p in root.iterdir() if p.name.startswith((".step_", f".{LATEST}."))]
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return leftovers


def damage(checkpoint: Path, checksum: bool = True) -> str | None:
    """Why `checkpoint` cannot be used, or None when it is intact (sizes and checksums match its
    manifest). A checkpoint from before manifests existed is accepted when both files are there."""
    checkpoint = Path(checkpoint)
    weights = SHARDED if is_sharded(checkpoint) else WEIGHTS
    missing = [f for f in (weights, STATE) if not (checkpoint / f).exists()]
    if missing:
        return f"{', '.join(missing)} missing"
    if not (checkpoint / MANIFEST).is_file():
        return None
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
        expected = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, meta in expected.items():
        if not (checkpoint / name).is_file():
            return f"{name} missing"
        size = (checkpoint / name).stat().st_size
        if size != meta["bytes"]:
            return f"{name} has {size} bytes, {meta['bytes']} were written"
        if checksum and _sha256(checkpoint / name) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint of a run, or None when it has none. Damaged ones newer than it
    are passed over with a warning that names them and the one used instead."""
    found = checkpoints(run_dir)
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if pointer.is_file():  # LATEST first: a checkpoint kept beside newer ones by hand wins if named
        named = pointer.parent / pointer.read_text().strip()
        if named in found:
            found = [p for p in found if p != named] + [named]
    passed: list[str] = []
    for path in reversed(found):
        problem = damage(path)
        if problem is None:
            if passed:
                log.warning("passed over damaged checkpoint %s; using %s", "; ".join(passed), path.name)
            return path
        passed.append(f"{path.name} ({problem})")
    if passed:
        raise CheckpointError(f"every checkpoint in '{run_dir}' is damaged: {'; '.join(passed)}")
    return None


def resolve_checkpoint(path: Path) -> Path:
    """A run folder or one checkpoint folder -> an intact checkpoint folder, or a one-line error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"'{path}' does not exist")
    if (path / WEIGHTS).exists() or (path / STATE).exists():
        problem = damage(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint '{path}' is damaged: {problem}")
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint in '{path}' (expected {WEIGHTS} or checkpoints/step_*/)")
    return found


def is_sharded(checkpoint: Path) -> bool:
    """Whether a checkpoint holds sharded weights (`sharded/`) rather than `weights.safetensors`."""
    return (Path(checkpoint) / SHARDED).is_dir() and not (Path(checkpoint) / WEIGHTS).exists()


def load_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the task, whole, from either kind of checkpoint."""
    if is_sharded(checkpoint):
        from coalign.checkpoint_sharded import read_weights

        return read_weights(checkpoint)
    try:
        return load_file(str(Path(checkpoint) / WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read '{Path(checkpoint) / WEIGHTS}': {err}") from None


def load_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return torch.load(Path(checkpoint) / STATE, weights_only=False)
    except (RuntimeError, OSError, EOFError) as err:
        raise CheckpointError(f"cannot read '{Path(checkpoint) / STATE}': {err}") from None


def checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint was saved at, from its own record (never parsed from the folder name)."""
    manifest = Path(checkpoint) / MANIFEST
    if manifest.is_file():
        return int(json.loads(manifest.read_text())["step"])
    return int(load_state(checkpoint)["step"])  # checkpoints from before manifests


def model_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's tensors out of a task's weights, without the prefix."""
    return {k[len(MODEL_PREFIX) :]: v for k, v in weights.items() if k.startswith(MODEL_PREFIX)}
