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

from coalign.checkpoint import load_state, load_weights, save_checkpoint
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

    def weights(self) -> dict[str, torch.Tensor]:
        """Every tensor of the task, whole (under FSDP gathered on rank 0; empty elsewhere)."""
        if self.layout is None:
            return self.task.state_dict()
        from coalign.train.fsdp import full_weights

        return full_weights(self.task)

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights (those go to safetensors)."""
        plain = self.layout
        return {
            "optimizer": plain.optimizer_state() if plain else self.optimizer.state_dict(),
            "scheduler": plain.scheduler_state(self.scheduler) if plain else self.scheduler.state_dict(),
            "rng": rng_state(),
            "step": self.step,
            "data_position": self.step,  # batches consumed; the loader's order is a function of (seed, step)
            "skipped": self.skipped.record(),  # counts and the first rows of each reason
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.layout is None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        else:
            self.layout.load_optimizer_state(state["optimizer"])
            self.layout.load_scheduler_state(self.scheduler, state["scheduler"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        skipped = state.get("skipped", {})
        # {"counts", "rows"}; checkpoints from before rows were kept hold plain counts
        self.skipped = SkipCounter.from_record(skipped) if "counts" in skipped else SkipCounter(skipped)

    def save(self, run_dir: Path, keep: int, write: bool = True) -> Path | None:
        """Write a checkpoint (under FSDP every rank calls it, and only the one with `write` writes)."""
        weights, state = self.weights(), self.state_dict()
        return save_checkpoint(run_dir, self.step, weights, state, keep) if write else None

    def restore(self, checkpoint: Path) -> None:
        self.task.load_state_dict(load_weights(checkpoint))
        self.load_state_dict(load_state(checkpoint))
