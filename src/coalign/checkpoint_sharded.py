"""Sharded checkpoints (`train.checkpoint_format: sharded`), read without the trainer.

Inside `checkpoints/step_XXXXXXXX/` a sharded checkpoint holds, in place of `weights.safetensors`,

    sharded/              a torch.distributed.checkpoint (DCP) folder: `.metadata` and one
                          `__R_0.distcp` per rank R, each with that rank's shards of
                          {"task": every tensor of the task, "optimizer": {"state": ...}}
    state.pt              what is not a shard: scheduler, RNG, step (the data position), skip
                          counts, the optimizer's hyperparameters per group, the writing world size

A tensor that is whole on every rank (a projection head, a temperature) is written once, by one
rank. The manifest lists each of these files with its size and checksum, as for a full checkpoint.

`read_weights` gathers the task's tensors of such a checkpoint whole into this process (DCP's
no-process-group load), so evaluation, `load_run`, `model.init_from`, export and interpolation
read a sharded run like any other. The trainer's collective save and restore live in
`train/fsdp_checkpoint.py`.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from coalign.checkpoint import SHARDED, CheckpointError

TASK = "task"  # the DCP state dict's two parts
OPTIMIZER = "optimizer"
FORMAT = "sharded"  # the manifest's and state.pt's `format`


@contextlib.contextmanager
def one_process():
    """DCP warns on every load or save without a process group; in one process that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def read_metadata(checkpoint: Path) -> Metadata:
    try:
        return dcp.FileSystemReader(str(Path(checkpoint) / SHARDED)).read_metadata()
    except (OSError, EOFError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"cannot read '{Path(checkpoint) / SHARDED}': {err}") from None


def paths(metadata: Metadata) -> dict[str, tuple]:
    """Flat DCP key -> its path in the nested state dict, e.g. ("task", "model.towers.text...")
    or ("optimizer", "state", FQN, "exp_avg")."""
    return {k: tuple(v) for k, v in (metadata.planner_data or {}).items()}


def saved_tensors(metadata: Metadata, part: str = TASK) -> dict[str, TensorStorageMetadata]:
    """The task's tensors (name -> global size and dtype) that a sharded checkpoint holds."""
    where = paths(metadata)
    return {
        where[k][1]: m
        for k, m in metadata.state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata) and where.get(k, ())[:1] == (part,) and len(where[k]) == 2
    }


def read_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the task, whole, on this process's CPU: the sharded checkpoint's shards put
    together by DCP's own load without a process group (`no_dist`), whatever this process is."""
    checkpoint = Path(checkpoint)
    metadata = read_metadata(checkpoint)
    weights = {
        name: torch.empty(m.size, dtype=m.properties.dtype) for name, m in saved_tensors(metadata).items()
    }
    if not weights:
        raise CheckpointError(f"'{checkpoint / SHARDED}' holds no weights of a task")
    with one_process():
        dcp.load(
            {TASK: weights}, storage_reader=dcp.FileSystemReader(str(checkpoint / SHARDED)), no_dist=True
        )
    return weights
