"""The trainer's state: everything a resumed run needs to continue exactly where it stopped.

`TrainState` holds the task (model + objectives, with any buffers an objective keeps: momentum
encoders, queues), the optimizer, the scheduler, the step (which is also the data position: the
loader's order is a pure function of (seed, step)) and the skip counts. `state_dict` and
`load_state_dict` round-trip it with the RNG states; `save` / `restore` go through the library's
`coalign.checkpoint`, which owns the layout on disk.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coalign.checkpoint import is_sharded, load_state, load_weights, save_checkpoint
from coalign.data.sources.base import SkipCounter
from coalign.objectives.task import Task


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    task: Task
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    skipped: SkipCounter = field(default_factory=SkipCounter)
    # FSDP (train/fsdp.py): converts the sharded optimizer's state to the plain layout and back;
    # with one, `weights`, `state_dict` and `save` are collectives that every rank calls
    layout: Any = None
    # `train.checkpoint_format: sharded`: every rank writes its shards (train/fsdp_checkpoint.py)
    sharded: bool = False

    def weights(self) -> dict[str, torch.Tensor]:
        """Every tensor of the task, whole (under FSDP gathered on rank 0; empty elsewhere)."""
        if self.layout is None:
            return self.task.state_dict()
        from coalign.train.fsdp import full_weights

        return full_weights(self.task)

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights (those go to safetensors)."""
        plain = self.layout
        optimizer = plain.optimizer_state() if plain else self.optimizer.state_dict()
        return {"optimizer": optimizer, **self.trainer_state()}

    def trainer_state(self) -> dict[str, Any]:
        """What is neither a weight nor an optimizer moment: the same on every rank."""
        plain = self.layout
        return {
            "scheduler": plain.scheduler_state(self.scheduler) if plain else self.scheduler.state_dict(),
            "rng": rng_state(),
            "step": self.step,
            "data_position": self.step,  # batches consumed; the loader's order is a function of (seed, step)
            "skipped": self.skipped.record(),  # counts and the first rows of each reason
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.layout is None:
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            self.layout.load_optimizer_state(state["optimizer"])
        self.load_trainer_state(state)

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        if self.layout is None:
            self.scheduler.load_state_dict(state["scheduler"])
        else:
            self.layout.load_scheduler_state(self.scheduler, state["scheduler"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        skipped = state.get("skipped", {})
        # {"counts", "rows"}; checkpoints from before rows were kept hold plain counts
        self.skipped = SkipCounter.from_record(skipped) if "counts" in skipped else SkipCounter(skipped)

    @property
    def collective(self) -> bool:
        """Whether saving is a collective that every rank calls (FSDP gathers, sharded writes)."""
        return self.layout is not None or self.sharded

    def save(self, run_dir: Path, keep: int, write: bool = True) -> Path | None:
        """Write a checkpoint (when `collective`, every rank calls it; with the full format only
        the one with `write` writes, with the sharded one every rank writes its shards)."""
        if self.sharded:
            from coalign.train.fsdp_checkpoint import save_sharded

            return save_sharded(self, run_dir, keep)
        weights, state = self.weights(), self.state_dict()
        return save_checkpoint(run_dir, self.step, weights, state, keep) if write else None

    def restore(self, checkpoint: Path) -> None:
        """Load a checkpoint of either format (a sharded one is a collective under torchrun)."""
        if is_sharded(checkpoint):
            from coalign.train.fsdp_checkpoint import load_sharded

            return load_sharded(self, checkpoint)
        self.task.load_state_dict(load_weights(checkpoint))
        self.load_state_dict(load_state(checkpoint))
