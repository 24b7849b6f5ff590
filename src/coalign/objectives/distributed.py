"""Every objective sees the global batch: features gathered across ranks, with a gradient that is
summed back to the rank that computed them.

Why summed: after the gather every rank computes the same loss L over the global batch. The rows a
rank encoded reach L on every rank, so their true gradient is the sum over ranks of what each
rank's copy of L sends back; the backward of the gather below all-reduces (sums) the gradient of the
gathered tensor and keeps the local rows. The trainer then averages parameter gradients over the
ranks, and the two factors cancel: each parameter gets exactly dL/dθ of the single-process run on
the same global batch. A plain `all_gather` carries no gradient to the other ranks' rows, and one
whose backward does not sum scales the gradient by 1/world (the bug lightly and TorchMultimodal
shipped); the two-process tests check the gradients of every objective against one process.

Rows: a rank's batch may be smaller than its share (skipped samples), and a modality covers only the
rows that have it, so every gathered tensor may have a different number of rows per rank. One
`all_gather_object` per step exchanges the row counts and shapes; tensors are padded to the largest
count, gathered, and cut back, concatenated in rank order, which is the order of the global batch.

Local loss (OpenCLIP's `--local-loss --gather-with-grad`): an objective that supports it computes
only the loss terms of this rank's rows (its queries) against every gathered column, so each rank
holds (B_local, B_global) logits rather than (B_global, B_global). `Rows` (from `own_rows`) says which
of an objective's M row-aligned samples are this rank's; `Rows.mean` turns the per-row terms of
those into W * (their share of the global mean), a value whose mean over the ranks is the global
mean. Why that scaling: the parameter gradients are averaged over the ranks (train/distributed.py)
and the gather's backward sums the gradients of every rank's copy of a row, so the averaged gradient
of W * share_r is the sum over ranks of d share_r, i.e. the gradient of the global loss, exactly.
`mean_over_ranks` then gives every rank the global value to log (one small all-reduce).

Objectives that encode, fuse or decode the batch again (MAE, data2vec, M3AE, MLM, ITM, captioning,
WRA) do that for their own rows (`Rows.pick`), and turn their means into shares with `Rows.share`
(rows of equal weight) or `Rows.per_item` (items whose number varies per row); their random masks
are drawn for every row of the global batch and cut, so that each rank draws what one process would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from coalign.models.encoders.base import Tokens
from coalign.models.model import Features


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _AllGather(torch.autograd.Function):
    """(R, ...) padded local rows -> (world, R, ...) from every rank; backward: sum, keep the local."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # reduce_scatter would do, but gloo lacks it
        return grad[dist.get_rank()]


def _gather(x: torch.Tensor, rows: list[int], grad: bool) -> torch.Tensor:
    """Concatenate every rank's `x` (rows[r] rows on rank r) in rank order. With `grad` (which must
    agree on every rank) the backward all-reduces on every rank: a rank whose `x` carries no
    gradient (it has no rows of the key) still joins, through a leaf that does."""
    most = max(rows)
    if grad and not x.requires_grad:
        x = x.detach().requires_grad_()
    padded = x.new_zeros((most, *x.shape[1:]))
    padded[: x.shape[0]] = x
    if grad:
        stacked = _AllGather.apply(padded)
    else:
        with torch.no_grad():
            out = [torch.empty_like(padded) for _ in rows]
            dist.all_gather(out, padded.contiguous())
            stacked = torch.stack(out)
    return torch.cat([stacked[r, :n] for r, n in enumerate(rows)])


def _describe(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (tuple(t.shape), t.dtype)


def _fields(f: Features) -> dict[str, torch.Tensor | None]:
    return {
        "tokens": f.tokens.tokens,
        "mask": f.tokens.mask,
        "pooled": f.pooled,
        "embedding": f.embedding,
        "group_mask": f.group_mask,
    }


GRAD_FIELDS = ("tokens", "pooled", "embedding")
LOCAL_KEY = "local_rows"  # the key of the global batch that holds this rank's `Share`
OWN_KEY = "own_batch"  # the key of the global batch that holds this rank's own batch dict
PART_KEY = "part_of"  # the key of a rank's own batch, handed to an objective that exchanges: W


def as_part(batch: dict[str, Any]) -> dict[str, Any]:
    """This rank's own batch, marked as one of the world's parts of the global batch (for an
    objective that does its own communication, such as SigLIP's ring)."""
    return {**batch, PART_KEY: world_size()}


def parts(batch: dict[str, Any]) -> int:
    """Of how many ranks' batches `batch` is one (1: it is the whole batch, or was gathered)."""
    return batch.get(PART_KEY, 1)


@dataclass(frozen=True)
class Share:
    """This rank's rows of the global batch: [start, stop), gathered in rank order; `world` ranks."""

    start: int
    stop: int
    world: int


@dataclass(frozen=True)
class Rows:
    """Of an objective's `total` row-aligned samples, the ones [start, stop) whose loss terms this rank
    computes (local loss). In one process, or on a batch that was not gathered: all of them."""

    start: int
    stop: int
    total: int
    world: int = 1

    @classmethod
    def every(cls, total: int) -> Rows:
        return cls(0, total, total, 1)

    @property
    def count(self) -> int:
        return self.stop - self.start

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a (total, ...) tensor (a view)."""
        return x[self.start : self.stop]

    def index(self, device: torch.device | None = None) -> torch.Tensor:
        """(count,) their positions among the total rows: each one's positive column."""
        return torch.arange(self.start, self.stop, device=device)

    def shifted(self, by: int, total: int) -> Rows:
        """The same rows offset by `by` in a longer sequence of `total` (the second view of SimCLR)."""
        return Rows(self.start + by, self.stop + by, total, self.world)

    def pick(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of `x` (total, ...) for an objective that encodes them again; when it owns
        none, `x`'s first row as a stand-in: every rank must run the towers (under FSDP their forward
        all-gathers the weights) and some encoders cannot take zero rows. `share` and `per_item` then
        weigh the stand-in's terms by exactly 0."""
        return x[:1] if self.count == 0 and x.shape[0] > 0 else self.take(x)

    def pick_tokens(self, t: Tokens) -> Tokens:
        """`pick` on a tower's tokens and their padding mask."""
        return Tokens(self.pick(t.tokens), None if t.mask is None else self.pick(t.mask))

    def share(self, mean: torch.Tensor) -> torch.Tensor:
        """W * this rank's share of a mean over rows of equal weight, from `mean` over its own rows
        (`pick`ed): the mean over the ranks of these values is the global mean (0 for a stand-in)."""
        return mean * (self.world * self.count / max(self.total, 1))

    def per_item(self, count: int | torch.Tensor) -> float:
        """The factor that turns a sum over this rank's `count` items (tokens, positions: a number
        that varies per row and per draw) into W * its share of the mean over every rank's items: 1 /
        count in one process; under several ranks W / (the counts summed over the ranks, one small
        all-reduce that every rank must join), and 0 for a `pick`ed stand-in."""
        count = int(count) if self.count else 0
        if self.world == 1:
            return 1.0 / max(count, 1)
        total = sum_over_ranks(torch.tensor(count))
        return 0.0 if self.count == 0 else self.world / max(total, 1)

    def repeated(self, copies: int) -> Rows:
        """The same rows after each row was repeated `copies` times in place (row b -> b * c .. b * c +
        c - 1): data2vec's masked copies of each sample."""
        return Rows(self.start * copies, self.stop * copies, self.total * copies, self.world)

    def mean(self, values: torch.Tensor, total: int | None = None) -> torch.Tensor:
        """The mean over all `total` rows (default: self.total) of per-row terms, from this rank's
        terms `values` (count,): W * sum(values) / total; its mean over the ranks is the mean."""
        n = self.total if total is None else total
        return values.sum() * (self.world / max(n, 1))


def own_rows(batch: dict[str, Any], keys: tuple[str, ...] | list[str], total: int) -> Rows:
    """This rank's share of the `total` samples that have every key (in `select_present`'s order).

    They are contiguous: the global batch is the ranks' batches in rank order, and selecting the
    rows present in every key keeps that order."""
    share: Share | None = batch.get(LOCAL_KEY)
    if share is None:
        return Rows.every(total)
    present = batch.get("present", {})
    every = None
    for k in keys:
        m = present.get(k)
        if m is not None:
            every = m if every is None else every & m
    if every is None:
        start, stop, found = share.start, share.stop, len(batch["id"])
    else:
        counts = torch.stack([every[: share.start].sum(), every[: share.stop].sum(), every.sum()])
        start, stop, found = counts.tolist()  # one host sync
    if found != total:
        raise ValueError(f"{total} aligned rows of {list(keys)}, but the present masks select {found}")
    return Rows(start, stop, total, share.world)


def from_rank_zero(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's `x` on every rank (a random draw that every rank's loss terms must share, such as
    Symile's negatives: the ranks' RNG streams part once their batches differ in shape)."""
    if world_size() > 1:
        x = x.contiguous()
        dist.broadcast(x, src=0)
    return x


def sum_over_ranks(x: torch.Tensor) -> int:
    """The sum over the ranks of a count `x` (0-d): the global normaliser of a local loss whose
    denominator depends on each rank's own random draw (MLM's chosen positions)."""
    x = x.detach().to(torch.int64).reshape(1).clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return int(x.item())


def mean_over_ranks(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every value's mean over the ranks (one all-reduce): the global loss and metrics, to log. A
    value with a gradient keeps it (value + (mean - value).detach()): the backward stays local."""
    keys = [k for k, v in out.items() if isinstance(v, torch.Tensor) and v.ndim == 0]
    if not keys:
        return out
    flat = torch.stack([out[k].detach().float() for k in keys])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    reduced = dict(out)
    for k, mean in zip(keys, flat, strict=True):
        v = out[k]
        mean = mean.to(v.dtype)
        reduced[k] = v + (mean - v.detach()) if v.requires_grad else mean
    return reduced


def _device(features: dict[str, Features], batch: dict[str, Any]) -> torch.device:
    """Where this rank's tensors live; a rank with none of a key still gathers on that device (NCCL
    needs CUDA tensors even for an empty share)."""
    for f in features.values():
        return f.embedding.device
    for v in batch.values():
        if isinstance(v, torch.Tensor):
            return v.device
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def gather_global(
    features: dict[str, Features], batch: dict[str, Any], inputs: bool = False
) -> tuple[dict[str, Features], dict[str, Any]]:
    """The global batch's features (with gradients to the local rows) and its batch dict (`present`
    masks; with `inputs`, the batch tensors too, without gradients: an objective such as distillation
    re-encodes them with a teacher). Call it on every rank, in step."""
    n_local = len(batch["id"])
    local = {
        "n": n_local,
        "features": {k: {name: _describe(t) for name, t in _fields(f).items()} for k, f in features.items()},
        # which fields carry a gradient: a rank without the key must still join the backward
        "grad": {
            k: [n for n, t in _fields(f).items() if t is not None and t.requires_grad]
            for k, f in features.items()
        },
        "present": sorted(batch.get("present", {})),
        "inputs": {k: _describe(v) for k, v in batch.items() if inputs and isinstance(v, torch.Tensor)},
    }
    metas: list[Any] = [None] * world_size()
    dist.all_gather_object(metas, local)
    counts = [m["n"] for m in metas]

    def layout(key: str, found: list[tuple | None]) -> tuple[list[int], tuple, torch.dtype]:
        """Rows per rank, trailing shape and dtype of one tensor from every rank's description."""
        shapes = [d for d in found if d is not None]
        shape, dtype = shapes[0]
        tails = {s[1:] for s, _ in shapes}
        if len(tails) > 1:
            raise ValueError(f"'{key}' has shapes {sorted(tails)} on different ranks; they must agree")
        return [d[0][0] if d is not None else 0 for d in found], shape[1:], dtype

    device = _device(features, batch)
    out: dict[str, Features] = {}
    keys = sorted({k for m in metas for k in m["features"]})
    for key in keys:
        mine = _fields(features[key]) if key in features else {}
        gathered: dict[str, torch.Tensor | None] = {}
        for name in ("tokens", "mask", "pooled", "embedding", "group_mask"):
            if all(m["features"].get(key, {}).get(name) is None for m in metas):
                gathered[name] = None
                continue
            rows, tail, dtype = layout(f"{key} {name}", [m["features"].get(key, {}).get(name) for m in metas])
            x = mine.get(name)
            if x is None:
                x = torch.zeros((0, *tail), dtype=dtype, device=device)
            grad = name in GRAD_FIELDS and any(name in m["grad"].get(key, ()) for m in metas)
            gathered[name] = _gather(x, rows, grad=grad)
        out[key] = Features(
            Tokens(gathered["tokens"], gathered["mask"]),
            gathered["pooled"],
            gathered["embedding"],
            gathered["group_mask"],
        )

    me = rank()
    start = sum(counts[:me])
    global_batch: dict[str, Any] = {
        "id": [None] * sum(counts),
        "present": {},
        LOCAL_KEY: Share(start, start + n_local, world_size()),
        OWN_KEY: batch,
    }
    for key in sorted({k for m in metas for k in m["present"]} | set(keys)):
        mask = batch.get("present", {}).get(key)
        if mask is None:
            mask = torch.full((n_local,), key in batch, dtype=torch.bool, device=device)
        global_batch["present"][key] = _gather(mask.to(device), counts, grad=False)
    for key in sorted({k for m in metas for k in m["inputs"]}):
        rows, tail, dtype = layout(key, [m["inputs"].get(key) for m in metas])
        x = batch.get(key)
        if not isinstance(x, torch.Tensor):
            x = torch.zeros((0, *tail), dtype=dtype, device=device)
        global_batch[key] = _gather(x, rows, grad=False)
    return out, global_batch


def encode_own_rows(
    encode: Callable[[dict[str, Any]], dict[str, Features]], batch: dict[str, Any]
) -> dict[str, Features]:
    """`encode(batch)` (a teacher's or a momentum model's features, without gradient) on a gathered
    global batch, computed by each rank for its own rows only and gathered: for an encoder that
    treats rows independently (eval mode) the same features as encoding the whole batch on every
    rank, at 1/world of the compute. Call it on every rank, in step."""
    local = batch.get(OWN_KEY)
    if local is None:
        return encode(batch)
    with torch.no_grad():
        features = encode(local)
    return gather_global(features, local)[0]
