"""Sharded checkpoints (`train.checkpoint_format: sharded`): every rank writes and reads its own
shards of the weights and the optimizer state with torch.distributed.checkpoint (DCP), instead of
rank 0 gathering the whole of them (the full format, `train/fsdp.py`). The layout on disk and the
readers that need no process group are in `coalign/checkpoint_sharded.py`.

Saving is a collective: rank 0 makes the hidden temporary folder and tells the others its name,
every rank writes its shards into it (DCP: a tensor whole on every rank is written once), rank 0
adds the trainer's scalar state (`TrainState.trainer_state`: scheduler in the one-process layout,
RNG, step, skip counts) and each optimizer group's hyperparameters by parameter name, the ranks
checksum the files between them, and rank 0 writes the manifest and renames the folder into place
(`checkpoint.finish_checkpoint`: atomic, LATEST, pruning), as for a full checkpoint.

Loading reshards: DCP records every tensor's global shape, so a checkpoint written by N ranks
loads into M ranks' shards, or into one plain process's whole tensors. The optimizer groups are
matched by parameter name, so FSDP's split of sharded and whole parameters into separate groups
(`train/optim.py`) and one process's groups load from each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from coalign.checkpoint import (
    SHARDED,
    STATE,
    CheckpointError,
    begin_checkpoint,
    file_record,
    finish_checkpoint,
    load_state,
)
from coalign.checkpoint_sharded import (
    FORMAT,
    OPTIMIZER,
    TASK,
    one_process,
    paths,
    read_metadata,
    saved_tensors,
)
from coalign.io import fsync_dir, fsync_file
from coalign.train.state import TrainState

PARAMS = "params"


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank (a small picklable object)."""
    if _world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _checksums(folder: Path) -> dict[str, dict]:
    """The manifest records of every file under `folder` (relative names), hashed by the ranks in
    turn (file i by rank i mod N) rather than all by rank 0. A collective; rank 0 lists the files
    (once it has written its own), so every rank hashes from the same list."""
    rank, world = _world()
    found = (
        sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if rank == 0 else None
    )
    names = _from_rank0(found)
    mine = {n: file_record(folder / n) for i, n in enumerate(names) if i % world == rank}
    if world == 1:
        return mine
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    return {n: r for part in parts for n, r in part.items()}


def save_sharded(state: TrainState, run_dir: Path, keep: int) -> Path | None:
    """Write checkpoints/step_XXXXXXXX as a sharded checkpoint; every rank calls it. Returns the
    folder on rank 0, None elsewhere."""
    rank, world = _world()
    final, tmp = _from_rank0(begin_checkpoint(run_dir, state.step) if rank == 0 else None)
    optim = get_optimizer_state_dict(state.task, state.optimizer)  # keyed by parameter name
    shards = {TASK: get_model_state_dict(state.task), OPTIMIZER: {"state": optim["state"]}}
    with one_process():  # DCP warns in one process (no process group), where that is the intent
        dcp.save(shards, storage_writer=dcp.FileSystemWriter(str(tmp / SHARDED)))  # fsyncs each file
    scalars = {
        **state.trainer_state(),
        "param_groups": optim["param_groups"],  # hyperparameters and parameter names per group
        "format": FORMAT,
        "world": world,
    }
    if rank == 0:
        fsync_dir(tmp / SHARDED)
        torch.save(scalars, tmp / STATE)
        fsync_file(tmp / STATE)
    files = _checksums(tmp)  # every rank hashes a share, after rank 0 wrote the state
    if rank != 0:
        return None
    return finish_checkpoint(tmp, final, state.step, files, keep, format=FORMAT, world=world)


def _regroup(saved: list[dict], current: list[dict], checkpoint: Path) -> list[dict]:
    """This optimizer's groups (parameter names) with the saved hyperparameters of their
    parameters, whichever way the saving run had grouped them."""
    owner = {name: {k: v for k, v in g.items() if k != PARAMS} for g in saved for name in g[PARAMS]}
    names = [n for g in current for n in g[PARAMS]]
    if set(names) != set(owner):
        lost, new = sorted(set(owner) - set(names)), sorted(set(names) - set(owner))
        raise CheckpointError(
            f"checkpoint '{checkpoint}' was trained with other parameters: {len(lost)} of its own are "
            f"not in this run{' (e.g. ' + lost[0] + ')' if lost else ''}, {len(new)} of this run's not "
            f"in it{' (e.g. ' + new[0] + ')' if new else ''}; the recipe's model or objectives changed"
        )
    groups = []
    for g in current:
        hyper = [owner[n] for n in g[PARAMS]]
        if any(h != hyper[0] for h in hyper):  # one group here, groups with other settings there
            raise CheckpointError(f"checkpoint '{checkpoint}': parameter {g[PARAMS][0]}'s group changed")
        groups.append({**(hyper[0] if hyper else {}), PARAMS: g[PARAMS]})
    return groups


def _check_tensors(task_state: dict[str, Any], checkpoint: Path) -> None:
    saved = saved_tensors(read_metadata(checkpoint))
    missing, extra = sorted(set(task_state) - set(saved)), sorted(set(saved) - set(task_state))
    resized = [n for n in task_state if n in saved and tuple(saved[n].size) != tuple(task_state[n].shape)]
    if missing or extra or resized:
        what = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
        what += [f"{len(extra)} unexpected (e.g. {extra[0]})"] if extra else []
        what += [f"{len(resized)} of another shape (e.g. {resized[0]})"] if resized else []
        raise CheckpointError(
            f"checkpoint '{checkpoint}' does not fit this run's task: tensors {', '.join(what)}"
        )


def load_sharded(state: TrainState, checkpoint: Path) -> None:
    """Restore `state` (weights, optimizer, scheduler, RNG, step) from a sharded checkpoint, with
    any world size (a collective under torchrun, a plain load in one process)."""
    checkpoint = Path(checkpoint)
    saved = load_state(checkpoint)
    task_state = get_model_state_dict(state.task)
    _check_tensors(task_state, checkpoint)
    optim = get_optimizer_state_dict(state.task, state.optimizer)  # a state for every parameter
    stateful = {p[2] for p in paths(read_metadata(checkpoint)).values() if p[:2] == (OPTIMIZER, "state")}
    # a parameter that never had a gradient had no optimizer state when saved: it gets none again
    moments = {name: s for name, s in optim["state"].items() if name in stateful}
    with one_process():
        dcp.load(
            {TASK: task_state, OPTIMIZER: {"state": moments}},
            storage_reader=dcp.FileSystemReader(str(checkpoint / SHARDED)),
        )
    set_model_state_dict(state.task, task_state)
    groups = _regroup(saved["param_groups"], optim["param_groups"], checkpoint)
    options = StateDictOptions(strict=len(moments) == len(optim["state"]))
    set_optimizer_state_dict(
        state.task, state.optimizer, {"state": moments, "param_groups": groups}, options=options
    )
    state.load_trainer_state(saved)
