"""Momentum model, feature queues and momentum distillation (MoCo, He et al. 2020; ALBEF, Li et al.
2021, arXiv:2107.07651), and the `itc` objective that uses all three.

**The momentum model** is an `EMA` (`models/ema.py`) of the whole `MultimodalModel` (towers, heads,
fusion part), one per model however many objectives read it: the first objective that asks for it
(`momentum_model`) holds it as a submodule (so it is saved in checkpoints once, under that
objective's name) and updates it after every optimizer step (`after_step`, called by the Task); the
others keep a reference. Its features for a batch are computed once per step and shared
(`momentum_features`).

**`itc`** (ALBEF's image-text contrastive loss): for pairs (a_i, b_i) with online embeddings a, b
and momentum embeddings a', b', and FIFO queues Qa, Qb of the momentum embeddings of the last K
pairs (earlier batches),

    p_ab(i) = softmax_j(s * a_i . [b'; Qb]_j)                  (M + K columns)
    hard_ab = -mean_i log p_ab(i)[i]                           (the pair's own column; queue: negatives)
    q_ab(i) = softmax_j(s * a'_i . [b'; Qb]_j)                 (the momentum model's distribution)
    L_ab    = (1 - alpha) hard_ab + alpha mean_i KL(q_ab(i) || p_ab(i))

and symmetrically L_ba; the loss is (L_ab + L_ba) / 2. s is the learnt logit scale (1 / temperature),
also used, detached, for q. ALBEF writes the soft part as a cross-entropy with q: it differs from the
KL by q's entropy, which has no gradient, so the gradients agree and the KL reads 0 when the model
agrees with its momentum copy. The queue holds momentum embeddings only, never a positive: entry
j of the queue is a negative for every row. After the loss the batch's momentum embeddings go into
the queues (the oldest leave first); a queue that is not full yet contributes the entries it has.
The queues are buffers: checkpointed with the run, so resume continues the same queue.

Under several ranks the Task hands objectives the global batch: each rank encodes its own rows with
the momentum model and the features are gathered (`encode_own_rows`), so every rank holds the same
momentum features and pushes the same rows: the queues stay identical.
"""

from __future__ import annotations

from typing import Any

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from coalign.models.ema import EMA
from coalign.models.model import Features, MultimodalModel
from coalign.objectives.base import LearnedScale, Objective, ObjectiveConfig, TemperatureOptions, paired
from coalign.objectives.distributed import encode_own_rows
from coalign.registry import OBJECTIVES, ConfigError


class MomentumOptions(ObjectiveConfig):
    """The EMA decay of the momentum model (ALBEF: 0.995) for every objective that reads it."""

    momentum: float = pydantic.Field(0.995, ge=0.0, lt=1.0)


def momentum_model(owner: nn.Module, model: MultimodalModel, decay: float) -> EMA:
    """The model's one momentum copy, made on first request. The first `owner` holds it (registered:
    saved and moved with the owner) and sets `owns_momentum`; later ones keep an unregistered
    reference, so its weights appear once in the Task's state dict."""
    ema = model.__dict__.get("_momentum")
    if ema is None:
        ema = EMA(model, decay)
        owner.momentum = ema  # nn.Module.__setattr__: a submodule of the owner
        owner.owns_momentum = True
        object.__setattr__(model, "_momentum", ema)  # found by later objectives; not the model's weights
        return ema
    if ema.decay != decay:
        raise ConfigError(
            f"two objectives ask for the momentum model with different decays ({ema.decay} and {decay}); "
            "they share one copy: give them the same `momentum`"
        )
    object.__setattr__(owner, "momentum", ema)
    owner.owns_momentum = False
    return ema


def momentum_features(ema: EMA, batch: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Features]:
    """The momentum model's features of `keys` of `batch`, computed once per batch: the objectives of
    one step get the same dict object, so the cache holds the last batch (by identity)."""
    keys = tuple(sorted(keys))
    cache = ema.__dict__.get("_cache")
    if cache is not None and cache[0] is batch and cache[1] == keys:
        return cache[2]
    # each rank encodes its own rows, then the features are gathered (objectives/distributed.py)
    features = encode_own_rows(lambda part: ema({k: part[k] for k in keys if k in part}), batch)
    ema.__dict__["_cache"] = (batch, keys, features)
    return features


def clear_momentum_cache(ema: EMA) -> None:
    ema.__dict__.pop("_cache", None)


def soft_kl(logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(n,) KL(q || softmax(logits)) per row, 0 log 0 = 0 (a blocked logit of -inf has q = 0)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    q = q.float()
    terms = torch.where(q > 0, q * (q.clamp_min(1e-38).log() - logp), torch.zeros_like(q))
    return terms.sum(-1)


class FeatureQueue(nn.Module):
    """FIFO queues of K paired embedding rows (a, b), as buffers (saved, restored on resume)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = size
        self.register_buffer("a", torch.zeros(size, dim))
        self.register_buffer("b", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # the next row to write
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # rows filled so far

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, E), (n, E): the rows held, oldest first (n <= K)."""
        n, ptr = int(self.count), int(self.ptr)
        if n < self.size:
            return self.a[:n], self.b[:n]
        order = torch.cat([torch.arange(ptr, n), torch.arange(0, ptr)]).to(self.a.device)
        return self.a[order], self.b[order]

    @torch.no_grad()
    def push(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Append M rows; the oldest leave once K are held (of a batch larger than K, its last K stay)."""
        a, b = a[-self.size :].detach(), b[-self.size :].detach()
        rows = (self.ptr + torch.arange(a.shape[0], device=self.ptr.device)) % self.size
        self.a[rows.to(self.a.device)] = a.to(self.a.dtype)
        self.b[rows.to(self.b.device)] = b.to(self.b.dtype)
        self.ptr.copy_((self.ptr + a.shape[0]) % self.size)
        self.count.copy_(torch.clamp(self.count + a.shape[0], max=self.size))


def itc_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    a_m: torch.Tensor,
    b_m: torch.Tensor,
    queue_a: torch.Tensor,
    queue_b: torch.Tensor,
    scale: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean KL) of the module docstring. a, b: (M, E) online; a_m, b_m: (M, E) momentum;
    queue_a, queue_b: (K, E) past momentum rows (K may be 0); all L2-normalised."""
    bank_a = torch.cat([a_m, queue_a.to(a_m.dtype)])  # (M + K, E)
    bank_b = torch.cat([b_m, queue_b.to(b_m.dtype)])
    target = torch.arange(a.shape[0], device=a.device)
    logits_ab = scale * a.float() @ bank_b.float().T  # (M, M + K)
    logits_ba = scale * b.float() @ bank_a.float().T
    hard = 0.5 * (F.cross_entropy(logits_ab, target) + F.cross_entropy(logits_ba, target))
    if alpha == 0:
        return hard, torch.zeros((), device=a.device)
    with torch.no_grad():  # the momentum model's distributions: targets
        s = scale.detach()
        q_ab = torch.softmax(s * a_m.float() @ bank_b.float().T, dim=-1)
        q_ba = torch.softmax(s * b_m.float() @ bank_a.float().T, dim=-1)
    kl = 0.5 * (soft_kl(logits_ab, q_ab).mean() + soft_kl(logits_ba, q_ba).mean())
    return (1 - alpha) * hard + alpha * kl, kl.detach()


class ITCConfig(TemperatureOptions, MomentumOptions):
    modalities: tuple[str, str] = ("image", "text")
    queue_size: int = pydantic.Field(0, ge=0)  # K past momentum pairs as extra negatives (ALBEF: 65536)
    alpha: float = pydantic.Field(0.4, ge=0.0, lt=1.0)  # weight of the distillation part (ALBEF: 0.4)


@OBJECTIVES.register("itc")
class ITC(LearnedScale, Objective):
    """ALBEF's contrastive loss: momentum model, queues, momentum distillation (module docstring)."""

    Config = ITCConfig
    name = "itc"
    needs_inputs = True  # the momentum model encodes the batch's inputs itself

    def __init__(self, cfg: ITCConfig | None = None, **kwargs: Any):
        super().__init__(cfg, **kwargs)
        self.init_scale(1.0 / self.cfg.init_temperature, self.cfg.max_logit_scale, self.cfg.learn_temperature)
        self.queue: FeatureQueue | None = None
        self.owns_momentum = False

    def bind(self, model: nn.Module, transforms: dict[str, Any] | None = None) -> None:
        self.hold_model(model)
        momentum_model(self, model, self.cfg.momentum)
        if self.cfg.queue_size:
            self.queue = FeatureQueue(self.cfg.queue_size, model.embed_dim)

    def after_step(self, step: int) -> None:
        """After each optimizer step: the momentum model moves towards the new weights."""
        if self.owns_momentum:
            self.momentum.update(self.model)
            clear_momentum_cache(self.momentum)

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        keys = tuple(self.cfg.modalities)
        a, b = paired(features, batch, *keys)  # (M, E) each
        a_m, b_m = paired(momentum_features(self.momentum, batch, keys), batch, *keys)
        if self.queue is not None:
            queue_a, queue_b = self.queue.contents()
        else:
            queue_a = queue_b = a_m.new_zeros(0, a_m.shape[1])
        scale = self.scale()
        loss, kl = itc_loss(a, b, a_m, b_m, queue_a, queue_b, scale, self.cfg.alpha)
        if self.queue is not None and self.training:
            self.queue.push(a_m, b_m)  # after the loss: a batch is never its own queue negative
        return {"itc_loss": loss, "logit_scale": scale.detach(), "kl": kl}
