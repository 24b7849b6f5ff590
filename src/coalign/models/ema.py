"""EMA: a frozen copy of a module whose weights follow an exponential moving average of the source's.

    shadow <- decay * shadow + (1 - decay) * source        (per parameter, after each optimizer step)

The momentum encoders of MoCo (He et al. 2020) and ALBEF (Li et al. 2021, arXiv:2107.07651), and the
teachers of BYOL, DINO and data2vec, are all this. The copy is a submodule of whoever holds the EMA,
so it is saved in checkpoints and moved between devices with it; its parameters have
`requires_grad=False`, so the optimizer (which takes trainable parameters only) never sees them, and
clipping and gradient averaging skip them. Buffers (BatchNorm statistics) are copied, not averaged.

The shadow always runs in eval mode: it gives targets, so no dropout and no random patch dropping.
Who calls `update` decides when it happens: the objectives here do it after each optimizer step
(`Task.after_step`), so a resumed run updates exactly as an uninterrupted one. A decay that changes
over training is passed to `update` by its caller as a function of the trainer's step, so it needs
no state of its own.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


class EMA(nn.Module):
    def __init__(self, source: nn.Module, decay: float):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.shadow = copy.deepcopy(source).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> EMA:
        super().train(mode)
        self.shadow.eval()  # a target, never trained: see the module docstring
        return self

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.shadow(*args, **kwargs)

    @torch.no_grad()
    def update(self, source: nn.Module, decay: float | None = None) -> None:
        """One EMA step towards `source`, a module with the shadow's parameter names, with `decay`
        (the constructor's when None: a schedule, such as data2vec's, passes this step's)."""
        decay = self.decay if decay is None else float(decay)
        params = dict(source.named_parameters())
        mine = list(self.shadow.named_parameters())
        missing = [n for n, _ in mine if n not in params]
        if missing:
            raise KeyError(f"EMA source lacks the shadow's parameters {missing[:5]}")
        # lerp: shadow + (1 - decay) (source - shadow) = decay shadow + (1 - decay) source, in one pass;
        # one foreach call per kind: FSDP's sharded parameters (DTensors, train/fsdp.py) and whole
        # tensors cannot share one
        pairs = [(p, _like(params[n].detach(), p)) for n, p in mine]
        for sharded in (False, True):
            kind = [(p, t) for p, t in pairs if isinstance(p, DTensor) is sharded]
            if kind:
                torch._foreach_lerp_([p for p, _ in kind], [t for _, t in kind], 1.0 - decay)
        buffers = dict(source.named_buffers())
        for name, b in self.shadow.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])


def _like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The source tensor `t` in the layout of the shadow's `p`: its dtype, and sharded as `p` is.
    A shadow sharded where its source is whole, or whole where it is sharded (FSDP shards a momentum
    copy as its source, `train/fsdp.py`, but a tower locked in the model may have a sharded copy)
    meets its source here: the sharded side is gathered (`full_tensor`) or the whole side cut to
    this rank's shard (`distribute_tensor`), collectives that every rank runs in the same update."""
    if isinstance(t, DTensor) and not isinstance(p, DTensor):
        t = t.full_tensor()
    elif isinstance(p, DTensor) and not isinstance(t, DTensor):
        t = distribute_tensor(t, p.device_mesh, p.placements)
    return t.to(p.dtype)  # both sharded: one mesh, FSDP's dim-0 shards on both sides
