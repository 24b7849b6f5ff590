"""FSDP2 (`train.fsdp: true`): each tower's parameters sharded over the ranks with `fully_shard`.

What is sharded: every transformer block of every tower (`Encoder.lock_blocks()`), each tower's
token embedding and every block of the fusion part, one FSDP unit each. A unit's
parameters live as 1/N shards (DTensors) between uses; its forward all-gathers them and frees them
after, its backward reduce-scatters the gradient (the mean over the ranks, the same arithmetic as
the plain all-reduce). The momentum copy (`models/ema.py`) of an objective is sharded the same way,
so its EMA update works shard by shard. What stays whole on every rank, with its gradient averaged
by the loop's flat all-reduce (`train/distributed.py`): each tower's parameters outside its blocks
and token embedding (patch embedding, positions, class token, norms: called outside the tower's
forward by the objectives that encode patches again, `patches` / `encode_patches` for MAE, data2vec,
M3AE, where a sharded weight would meet plain tensors), the projection heads, the fusion part's own
norms and heads (called outside its forward: `match_logits`, `context_tokens`), the objectives' own
parameters, towers that are wholly locked (nothing to train, and their feature caches run a
different number of forwards per rank), and every 0-d parameter (`fully_shard` cannot shard a
scalar such as a temperature `logit_scale`; one inside a tower is passed as `ignored_params`).
Those are small; the towers are where the memory is.

Checkpoints stay those of a plain run, written by rank 0: the full weights (`get_model_state_dict`
with `full_state_dict`, a collective on every rank), and the optimizer and scheduler state in the
layout one process would have (`to_plain` / `from_plain`: the sharded and the whole parameters sit
in separate optimizer groups, because a fused AdamW call cannot mix DTensors and tensors). So
`coalign eval`, `load_run`, `init_from` and a resume with one process or without FSDP read them as
any run's, and an FSDP run resumes from a plain checkpoint.

With one process there is nothing to shard: `train.fsdp` is then ignored (and said so).

Every rank runs every sharded tower in every step, also when its batch has no rows of that modality
(`stand_ins`): a tower's collectives need all the ranks.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from coalign.build import build_model
from coalign.checkpoint import model_weights
from coalign.config import Recipe
from coalign.data.sample import base_modality
from coalign.models.ema import EMA
from coalign.models.encoders.base import Encoder
from coalign.models.model import MultimodalModel, StandIn

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0's CPU


def is_sharded(p: torch.Tensor) -> bool:
    return isinstance(p, DTensor)


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a fusion part: the members of each ModuleList named `blocks`."""
    return [b for name, m in module.named_modules() if name.endswith("blocks") for b in m]


def _scalars(module: nn.Module) -> set[nn.Parameter]:
    return {p for p in module.parameters() if p.ndim == 0}


def _shard(module: nn.Module, mesh, whole: set[nn.Parameter] | None = None) -> None:
    """One FSDP unit (`whole`: parameters it leaves unsharded). Resharded after every forward, the
    outermost too (FSDP2 keeps a root's parameters gathered after its forward unless told): a
    forward without a backward (GradCache's first pass, the momentum copy) must not leave gathered
    copies that the optimizer step then makes stale."""
    ignored = _scalars(module) | (whole or set())
    fully_shard(module, mesh=mesh, reshard_after_forward=True, ignored_params=ignored or None)


def _shard_tower(tower: nn.Module, mesh) -> int:
    """fully_shard a tower block by block, then the tower; returns the number of units."""
    # token embeddings are units of their own: objectives call `tower.embed` outside the tower's
    # forward (MLM), and the tower's gathered weights exist only during that forward
    embeddings = [m for m in tower.modules() if isinstance(m, nn.Embedding)]
    blocks = [*embeddings, *tower.lock_blocks()]
    for block in blocks:
        _shard(block, mesh)
    # the tower's own unit (the root of its blocks) keeps its remaining parameters whole: the patch
    # hooks (`patches`, `encode_patches`) use them outside the tower's forward
    inside = {id(p) for b in blocks for p in b.parameters()}
    _shard(tower, mesh, {p for p in tower.parameters() if id(p) not in inside})
    return len(blocks) + 1


def _shard_model(model: MultimodalModel, mesh, towers: set[str] | None = None) -> int:
    """fully_shard the model's towers (`towers`, by default those with something to train) and its
    fusion blocks; returns the number of units."""
    units = 0
    for name, tower in model.towers.items():
        trains = any(p.requires_grad for p in tower.parameters())
        if not (trains if towers is None else name in towers):
            continue  # wholly locked: nothing to train (and a feature cache forwards per rank)
        units += _shard_tower(tower, mesh)
    if model.fusion is not None:
        for block in _blocks(model.fusion):
            _shard(block, mesh)
            units += 1
    return units


def shard_task(task: nn.Module, device: torch.device) -> str:
    """Shard the task's model and every momentum copy it holds, in place; says what. A copy is
    sharded as its source: a model's copy (ALBEF's momentum model) in the towers sharded in the
    task's model (its own parameters never train, so "has something to train" cannot pick them), a
    tower's copy (data2vec's teacher) as a tower. `EMA.update` then works shard by shard."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = _shard_model(task.model, mesh)
    towers = _sharded_towers(task.model)
    for m in task.modules():
        if not isinstance(m, EMA):
            continue
        if isinstance(m.shadow, MultimodalModel):
            units += _shard_model(m.shadow, mesh, towers)
        elif isinstance(m.shadow, Encoder) and towers:
            units += _shard_tower(m.shadow, mesh)
    params = [p for p in task.parameters() if p.requires_grad]
    sharded = sum(p.numel() for p in params if is_sharded(p))
    total = sum(p.numel() for p in params)
    return (
        f"FSDP: {units} units over {dist.get_world_size()} ranks; {sharded / max(total, 1):.0%} of the "
        f"{total:,} trainable parameters sharded (heads, objectives' and 0-d parameters stay whole)"
    )


# ------------------------------------------------------------------- every rank runs every tower


def _sharded_towers(model: MultimodalModel) -> set[str]:
    return {m for m, t in model.towers.items() if any(is_sharded(p) for p in t.parameters())}


def stand_ins(
    batches: list[dict[str, Any]], model: MultimodalModel, device: torch.device
) -> list[dict[str, Any]]:
    """`batches` (this step's batch, or its micro-batches: as many on every rank, in step) with a
    `StandIn` (`models/model.py`) for each key of a sharded tower that another rank's batch at the
    same position has and this one lacks, and the tower keys in one order on every rank.

    Without it a rank whose batch has no rows of a modality would skip that tower's forward, and so
    its FSDP all-gather and reduce-scatter, while the others wait in them. The stand-in's row is the
    first row of the lowest rank that has the key (one broadcast); its features keep no rows, so the
    losses, the gathered global batch and the gradients are those of the rank without the key (its
    tower's gradient is exactly zero, and the reduce-scatter averages it in as the plain all-reduce
    averages a missing one). A key that no rank has stays absent, as in one process. Costs one small
    `all_gather_object` per step; a no-op unless some tower is sharded."""
    towers = _sharded_towers(model)
    if not towers:
        return batches

    def keys(batch: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {
            k: (tuple(v.shape[1:]), v.dtype)
            for k, v in batch.items()
            if isinstance(v, torch.Tensor) and base_modality(k) in towers
        }

    mine = [keys(b) for b in batches]
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    out = []
    for i, batch in enumerate(batches):
        seen = [ranks[i] for ranks in every]
        order = list(dict.fromkeys(k for found in seen for k in found))  # the same on every rank
        if all(len(found) == len(order) for found in seen):
            out.append(batch)  # every rank has every key (the common case): the batch as it is
            continue
        filled = {k: v for k, v in batch.items() if k not in order}
        present = dict(batch.get("present", {}))
        for key in order:
            lacking = [key not in found for found in seen]
            if any(lacking):  # the lowest rank that has it sends its first row
                src = lacking.index(False)
                shape, dtype = seen[src][key]
                sends = dist.get_rank() == src  # the others receive into a new tensor, never their rows
                row = (
                    batch[key][:1].contiguous()
                    if sends
                    else torch.empty((1, *shape), dtype=dtype, device=device)
                )
                dist.broadcast(row, src=src)
            if key in batch:
                filled[key] = batch[key]
            else:
                filled[key] = StandIn(row)
                present[key] = torch.zeros(len(batch["id"]), dtype=torch.bool, device=device)
        filled["present"] = present
        out.append(filled)
    return out


# --------------------------------------------------------------------------------- gradient clipping


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a mix of sharded (DTensor) and whole gradients, which
    torch's foreach norm refuses: the squares of the local shards are summed over the ranks (one
    all-reduce), the whole gradients are the same on every rank and counted once. Same formula:
    scale by min(1, max_norm / (norm + 1e-6)). Returns the total norm (a tensor: no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    shards = [g.to_local() for g in grads if is_sharded(g)]
    whole = [g for g in grads if not is_sharded(g)]
    if not shards:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    device = shards[0].device
    squares = torch.stack([s.float().pow(2).sum() for s in shards]).sum()
    dist.all_reduce(squares)
    if whole:
        squares = squares + torch.stack([g.float().pow(2).sum() for g in whole]).sum().to(device)
    total = squares.sqrt()
    if math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(shards, coef)
        if whole:
            torch._foreach_mul_(whole, coef.to(whole[0].device))
    return total


# ------------------------------------------------------------------------------- checkpoint layout


def whole_model(
    weights: dict[str, torch.Tensor], recipe: Recipe, transforms: dict, device: torch.device
) -> MultimodalModel | None:
    """A plain model holding the gathered `weights` on rank 0, for evaluation during training (run
    once, on rank 0, without the other ranks); None on the ranks that got no weights."""
    if not weights:
        return None
    model = build_model(recipe, transforms)
    model.load_state_dict(model_weights(weights))
    return model.to(device)


def full_weights(task: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the task's state dict, whole, on rank 0's CPU (empty on the other ranks).
    A collective: every rank calls it."""
    return get_model_state_dict(task, options=FULL)


class PlainLayout:
    """Converts the optimizer and scheduler state of a sharded task to and from the layout of the
    plain (one-process) optimizer, by parameter name.

    `plain[j]` are the names of the plain optimizer's group j, in order (its state keys are the
    positions in their concatenation); `groups[i]` the names of this optimizer's group i, and
    `owner[i]` the plain group it was split from."""

    def __init__(self, task: nn.Module, optimizer: torch.optim.Optimizer, plain: list[list[str]]):
        names = {id(p): n for n, p in task.named_parameters()}
        self.task, self.optimizer, self.plain = task, optimizer, plain
        self.groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        where = {n: j for j, group in enumerate(plain) for n in group}
        self.owner = [where[g[0]] for g in self.groups]
        self.index = {n: k for k, n in enumerate(itertools.chain.from_iterable(plain))}

    def optimizer_state(self) -> dict[str, Any]:
        """The plain optimizer's `state_dict()` (a collective; the values are on rank 0)."""
        full = get_optimizer_state_dict(self.task, self.optimizer, options=FULL)
        state = {self.index[n]: s for n, s in full.get("state", {}).items()}
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in full.get("param_groups", [])]
        groups = (
            [
                {**hyper[self.owner.index(j)], "params": [self.index[n] for n in names]}
                for j, names in enumerate(self.plain)
            ]
            if hyper
            else []
        )
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, saved: dict[str, Any]) -> None:
        """Load a plain optimizer `state_dict()` (every rank passes the whole of it)."""
        if len(saved["param_groups"]) != len(self.plain):
            raise ValueError(
                f"the checkpoint's optimizer has {len(saved['param_groups'])} parameter groups, this "
                f"run's {len(self.plain)}: the recipe's trainable parameters changed"
            )
        flat = list(itertools.chain.from_iterable(self.plain))
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in saved["param_groups"]]
        full = {
            "state": {flat[int(k)]: s for k, s in saved["state"].items()},
            "param_groups": [
                {**hyper[j], "params": names} for j, names in zip(self.owner, self.groups, strict=True)
            ],
        }
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.task, self.optimizer, full, options=options)

    def scheduler_state(self, scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
        """The scheduler's state with its per-group lists (base_lrs, _last_lr) per plain group."""
        n = len(self.groups)
        return {
            k: [v[self.owner.index(j)] for j in range(len(self.plain))]
            if isinstance(v, list) and len(v) == n
            else v
            for k, v in scheduler.state_dict().items()
        }

    def load_scheduler_state(self, scheduler: torch.optim.lr_scheduler.LRScheduler, saved: dict) -> None:
        m = len(self.plain)
        lists = {k: v for k, v in saved.items() if isinstance(v, list) and len(v) == m}
        per_group = {k: [v[j] for j in self.owner] for k, v in lists.items()}
        scheduler.load_state_dict({**saved, **per_group})
