"""torch.distributed for the trainer: one process per device, started by torchrun.

`torchrun --nproc-per-node N -m coalign train RECIPE` (or `coalign train RECIPE --nproc N`, which runs
torchrun for you) starts N copies of the same loop. Each takes its slice of every global batch (the
order stays a function of (seed, step), so resume is exact at any world size that divides the
batch), the objectives see the global batch (`objectives/distributed.py`), parameter gradients are
averaged here, and only rank 0 writes checkpoints, logs and results or evaluates. gloo on the CPU,
NCCL on CUDA. If a rank fails, torchrun stops the others; a rank whose peer vanished mid-collective
says so in one line instead of hanging (`collective_timeout` bounds the wait).

Gradients are averaged explicitly rather than by wrapping the task in DistributedDataParallel: the
loop may run several backward passes per step (GradCache), and objectives may leave parameters
without a gradient in a step; one flat all-reduce per step after all backward passes is what both
need, and it is the same arithmetic DDP does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from coalign.data.sources.base import SkipCounter

COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def device(self) -> torch.device | None:
        """This rank's device under torchrun (its GPU), or None to let the runtime choose."""
        if self.active and torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu") if self.active else None

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init_from_env() -> Dist:
    """The process group torchrun describes in the environment (WORLD_SIZE > 1), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown(d: Dist | None = None) -> None:
    """Destroy the process group (of `d`, or whatever group is initialised) once every rank has
    reached this point. A gloo group left to the interpreter's exit, or destroyed by one rank while
    another still uses it, can abort a rank with "terminate called without an active exception",
    and torchrun then reports a run that finished as failed."""
    if (d is None or d.active) and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def average_gradients(module: torch.nn.Module, d: Dist) -> None:
    """Mean of every parameter's gradient over the ranks, in one flat all-reduce. A parameter that
    got no gradient on a rank counts as zero there; one that got none on any rank keeps `None`, so
    the optimizer leaves it alone (no weight decay, no moment decay), as in a single process.
    Sharded parameters (FSDP's DTensors, `train/fsdp.py`) are left out: their backward already
    reduce-scattered the mean."""
    if not d.active:
        return
    params = [p for p in module.parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if not params:
        return
    device = params[0].device if params else torch.device("cpu")
    missing = torch.tensor([p.grad is None for p in params], dtype=torch.int32, device=device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    dist.all_reduce(missing, op=dist.ReduceOp.SUM)  # on how many ranks each parameter had none
    flat /= d.world
    offset = 0
    for p, absent in zip(params, missing.tolist(), strict=True):
        n = p.numel()
        p.grad = None if absent == d.world else flat[offset : offset + n].view_as(p).clone()
        offset += n


def broadcast_state(module: torch.nn.Module, d: Dist) -> None:
    """Every rank starts from rank 0's parameters and buffers (as DDP does at construction): the ranks
    build their models from the same seed, but anything that drew random numbers before (rank 0
    fitting a tokenizer, say) would leave them different."""
    if not d.active:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def reduce_skips(local: SkipCounter, d: Dist) -> SkipCounter:
    """Every rank's skip counts (and skipped rows) merged; call on all ranks at the same step."""
    if not d.active:
        return SkipCounter(local, local.rows)
    records: list = [None] * d.world
    dist.all_gather_object(records, local.record())
    total = SkipCounter()
    for record in records:
        total.update(SkipCounter.from_record(record))
    return total


def agreed_lengths(lengths: dict[str, int]) -> dict[str, int]:
    """Per key, the longest of every rank's `MultimodalModel.trim_lengths`: the ranks' batches are
    gathered together (features, tokens, inputs), so each key keeps one width on all of them. One
    small `all_gather_object` per step; call on all ranks at the same step. Unchanged in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return lengths
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, lengths)
    return {k: max(theirs[k] for theirs in every if k in theirs) for k in lengths}


def launch(nproc: int, argv: list[str]) -> int:
    """`coalign train ... --nproc N`: run the same command under torchrun with N processes."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    # torchrun itself, run by this interpreter (a `torchrun` on PATH may belong to another Python)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    # Ctrl-C in a terminal reaches torchrun and every rank too, and the ranks then save together
    # (train/interrupt.py): wait for them instead of killing torchrun (as subprocess.call would);
    # a SIGTERM sent to this process alone is passed on to torchrun, which passes it to the ranks
    proc = subprocess.Popen([*cmd, "-m", "coalign", *argv])
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM)),
    }
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def sync_batch_norm(
    module: torch.nn.Module, d: Dist, device: torch.device
) -> tuple[torch.nn.Module, str | None]:
    """BatchNorm layers see the global batch's statistics under several CUDA ranks (SyncBatchNorm).
    On the CPU torch has no SyncBatchNorm: each rank normalises with its own slice's statistics, which
    is the one way a CPU multi-process run differs from one process; say so."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not d.active or not norms:
        return module, None
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module), None
    return module, (
        f"{len(norms)} BatchNorm layer(s) use each rank's own batch statistics (SyncBatchNorm needs "
        "CUDA); towers without BatchNorm train exactly as one process would"
    )
