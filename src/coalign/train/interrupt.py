"""Ctrl-C (SIGINT) and SIGTERM under torchrun: every rank stops at the same step and saves there.

One process simply turns Ctrl-C into a KeyboardInterrupt and saves wherever it stands. N ranks
cannot: the signal reaches each at another moment (one in a forward, one waiting in a collective
for it), and a checkpoint under FSDP is itself a collective that every rank must enter at the same
point, with the same step. So while the loop runs, the signals only set a flag, and at the end of
every step the ranks take the maximum of their flags (one all-reduce of one number, beside the
step's own host sync): from the first step at which any rank saw a signal, all of them save that
step's checkpoint together and raise `Interrupted`.

A terminal's Ctrl-C signals the whole process group: `coalign train --nproc N` (which ignores it
and waits), torchrun (which passes it on to the ranks, then kills them after its
`--shutdown-timeout`, 30 s by default) and every rank. Repeated signals change nothing.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from coalign.train.distributed import Dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised on every rank after the checkpoint of the step where a signal was seen is saved."""


class StopSignal:
    """Within `with`: SIGINT/SIGTERM set a flag instead of interrupting (several ranks only);
    `agreed()` is the collective that tells every rank whether any rank saw one."""

    def __init__(self, d: Dist, device: torch.device):
        self.d, self.device = d, device
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        if self.d.active and threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _note(self, signum: int, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def agreed(self) -> bool:
        """Whether any rank has seen a signal; every rank calls it at the same step."""
        if not self._previous:
            return False
        flag = torch.tensor([self.received is not None], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
