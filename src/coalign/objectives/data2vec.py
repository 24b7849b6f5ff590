"""Latent targets from an EMA teacher (data2vec, Baevski et al. 2022, arXiv:2202.03555; data2vec
2.0, arXiv:2212.07525; EVA-style feature prediction) for any patch tower.

The teacher is an `EMA` (models/ema.py) of the tower: it sees the *full* input, in eval mode, and
its targets are the average of its top-K blocks' outputs, each instance-normalised first (per
sample and channel, over the patches: data2vec's `instance_norm_target_layer`), at every content
patch (prefix tokens such as a CLS are left out):

    y_p = 1/K sum_{l in top K} IN(f_l)_p         f_l: block l's feed-forward output (B, P, D), before
                                                  its residual add, as data2vec reads it

The student is the tower itself on the *masked* input: it encodes a random (1 - mask_ratio) of the
patches through the tower's masking path (models/masking.py, the keep path of FLIP and MAE), drawn
uniformly or (`mask: block`) as data2vec 2.0's inverse block mask (`block_keep`: a few contiguous
`block_size` squares visible, the rest hidden; grid towers only), and
the light decoder of MAE (mask tokens at the hidden patches, the patches' positions, a small
transformer) predicts y at every patch. The loss is the mean squared error at the *hidden* patches
only (data2vec 2.0's L2 loss, averaged over the channels).

Multi-mask training (data2vec 2.0, `num_masks` M): the teacher encodes each full sample once and
the student is trained on M differently masked copies of it, the teacher's targets reused for all
M. The tower embeds the patches once too (`Patches.repeat`), so only the student's transformer and
the decoder run on B * M rows. Every mask hides the same number of patches, so the loss (the mean
over every hidden patch of the B * M rows) is the mean of the M single-mask losses. M = 1 is the
single-mask objective, draw for draw.

The teacher's parameters have requires_grad=False (never in the optimizer); it is a submodule of
the objective, so checkpoints hold it (`objectives.<i>.teacher.shadow.*`) and resume restores it
exactly; it moves towards the tower after each optimizer step (`after_step(step)`, called by the
Task with the trainer's step). The decay is `momentum`, constant, or with `momentum_end` and
`momentum_steps` data2vec's schedule (fairseq's `get_annealed_rate`): after optimizer step s

    tau(s) = momentum + (momentum_end - momentum) * min(s, momentum_steps) / momentum_steps

(data2vec anneals it towards 0.99999), a pure function of the step, which resume restores; at tau = 1
the teacher is frozen and the update is skipped, as data2vec does.
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from coalign.models.ema import EMA
from coalign.models.masking import Patches, block_keep, random_keep
from coalign.models.model import Features
from coalign.objectives.base import Objective
from coalign.objectives.distributed import Rows, own_rows
from coalign.objectives.mae import (
    DecoderOptions,
    MaskedDecoder,
    masked_tower,
    named_for,
    patch_loss,
    probe_patches,
)
from coalign.registry import OBJECTIVES, ConfigError


class Data2VecConfig(DecoderOptions):
    top_k: int = pydantic.Field(3, ge=1)  # K: how many of the teacher's last blocks are averaged
    momentum: float = pydantic.Field(0.999, ge=0.0, lt=1.0)  # the teacher's EMA decay (at step 0)
    momentum_end: float | None = pydantic.Field(None, ge=0.0, le=1.0)  # linearly to this decay ...
    momentum_steps: int | None = pydantic.Field(None, ge=1)  # ... over this many steps, then kept
    num_masks: int = pydantic.Field(1, ge=1)  # M masked copies of each sample per teacher pass
    mask: Literal["random", "block"] = "random"  # uniform patches, or data2vec 2.0's inverse blocks
    block_size: int = pydantic.Field(3, ge=1)  # the side of the visible squares of mask: block
    instance_norm: bool = True  # each block's output instance-normalised before the average

    @classmethod
    def tiny(cls) -> dict:
        return {**DecoderOptions.tiny(), "top_k": 1}

    @pydantic.model_validator(mode="after")
    def _schedule_whole(self):
        if (self.momentum_end is None) != (self.momentum_steps is None):
            raise ValueError(
                "momentum_end and momentum_steps go together (the decay rises from momentum to "
                "momentum_end over momentum_steps steps); set both, or neither for a constant momentum"
            )
        return self


def ema_decay(step: int, start: float, end: float | None = None, steps: int | None = None) -> float:
    """The teacher's decay for the update after optimizer step `step` (1 after the first): `start`
    rising linearly to `end` at step `steps`, then `end` (data2vec's `get_annealed_rate`); `start`
    throughout when `end` is None."""
    if end is None or steps is None:
        return start
    if step >= steps:
        return end
    return start + (end - start) * step / steps


def layer_targets(layers: list[torch.Tensor], instance_norm: bool = True) -> torch.Tensor:
    """The average of K (B, P, D) layer outputs, each instance-normalised over its P patches (per
    sample and channel, no affine, eps 1e-5: `F.instance_norm`) when `instance_norm`; float32."""
    out = None
    for y in layers:
        y = y.float()
        if instance_norm:
            y = F.instance_norm(y.transpose(1, 2)).transpose(1, 2)  # normalise over P
        out = y if out is None else out + y
    return out / len(layers)


@torch.no_grad()
def block_outputs(tower: nn.Module, x: Any, k: int) -> list[torch.Tensor]:
    """The feed-forward outputs (B, N, D) of the last k blocks of `tower` run on `x`, before each
    block's residual add, as forward hooks on the blocks' MLPs see them."""
    blocks = tower.lock_blocks()[-k:]
    outs: list[torch.Tensor] = []
    hooks = [b.mlp.register_forward_hook(lambda _m, _i, out: outs.append(out)) for b in blocks]
    try:
        tower(x)
    finally:
        for hook in hooks:
            hook.remove()
    return outs


@OBJECTIVES.register("data2vec")
class Data2Vec(Objective):
    Config = Data2VecConfig
    name = "data2vec"
    needs_inputs = True  # the teacher and the masked student encode the batch's inputs themselves

    def __init__(self, cfg: Data2VecConfig | None = None, **kwargs: Any):
        super().__init__(cfg, **kwargs)
        self.name = named_for("data2vec", self.cfg.modality)

    def bind(self, model: nn.Module, transforms: dict[str, Any] | None = None) -> None:
        tower = masked_tower(self.name, model, self.cfg.modality)
        depth = len(tower.lock_blocks())
        if self.cfg.top_k > depth:
            raise ConfigError(
                f"{self.name}: top_k {self.cfg.top_k} exceeds the {depth} blocks of the "
                f"'{self.cfg.modality}' tower; use 1..{depth}"
            )
        probe = probe_patches(tower)
        if self.cfg.mask == "block" and probe.grid is None:
            raise ConfigError(
                f"{self.name}: mask 'block' needs a grid of patches (vit, audio_transformer); the "
                f"'{self.cfg.modality}' tower's patches have none; use mask: random"
            )
        self._grid = probe.grid
        object.__setattr__(self, "_tower", tower)  # the model's (the Task's): not registered twice
        self.teacher = EMA(tower, self.cfg.momentum)  # a submodule: checkpointed, out of the optimizer
        c = self.cfg
        self.decoder = MaskedDecoder(
            tower.width,
            c.decoder_width,
            c.decoder_depth,
            c.decoder_heads,
            tower.width,
            int(tower.num_prefix_tokens),
            centres=probe.centres is not None,
        )

    def decay_at(self, step: int) -> float:
        """The teacher's decay after optimizer step `step` (the schedule of the module docstring)."""
        c = self.cfg
        return ema_decay(step, c.momentum, c.momentum_end, c.momentum_steps)

    def after_step(self, step: int) -> None:
        """After optimizer step `step`: the teacher moves towards the tower (a frozen one stays)."""
        decay = self.decay_at(step)
        if decay < 1.0:
            self.teacher.update(self._tower, decay)

    def targets(self, x: Any) -> torch.Tensor:
        """(B, P, D) the teacher's targets for every content patch of the full input."""
        shadow = self.teacher.shadow
        skip = int(shadow.num_prefix_tokens)
        layers = block_outputs(shadow, x, self.cfg.top_k)
        return layer_targets([y[:, skip:] for y in layers], self.cfg.instance_norm)

    def predict(
        self, x: Any, keep: torch.Tensor | None = None, masks: int = 1, own: Rows | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the student's predictions (B * M, P, D) at every patch, keep (B * M, K)) for M = `masks`
        masked copies of each sample, sample b's copy m at row b * M + m; the patches are embedded
        once, the transformer and the decoder run on every copy. `x` may be the `own` rows
        (`Rows.pick`) of a larger batch: masks drawn at random are then drawn for every row of it, so
        each rank hides what a single process would, and cut to these rows."""
        tower = self._tower
        patches = tower.patches(x).repeat(masks)  # (B * M, P, D)
        if keep is None:
            own = own or Rows.every(x.shape[0])
            drawn = self.draw_keep(patches, own.total * masks)
            keep = own.repeated(masks).take(drawn) if own.count else drawn[:masks]  # [:masks]: a stand-in
        tokens = tower.encode_patches(patches.tokens, keep).tokens  # (B * M, prefix + K, D)
        return self.decoder(tokens, keep, patches), keep

    def draw_keep(self, patches: Patches, rows: int | None = None) -> torch.Tensor:
        """(rows, K) visible patches (default: one per row of `patches`): uniform, or inverse blocks."""
        (B, P), ratio, device = patches.tokens.shape[:2], self.cfg.mask_ratio, patches.tokens.device
        B = B if rows is None else rows
        if self.cfg.mask == "block":
            return block_keep(B, self._grid, ratio, self.cfg.block_size, device)
        return random_keep(B, P, ratio, device)

    def latent_loss(
        self, x: Any, keep: torch.Tensor | None = None, own: Rows | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss over the `num_masks` masked copies, the teacher's targets (B, P, D)) of the `own`
        rows of `x` (all of them by default); `keep` (B * M, K) fixes their masks (drawn at random
        when None)."""
        m = self.cfg.num_masks
        own = own or Rows.every(x.shape[0])
        mine = own.pick(x)
        target = self.targets(mine)  # the one teacher pass, whatever M
        pred, keep = self.predict(mine, keep, m, own)
        return patch_loss(pred, target.repeat_interleave(m, dim=0) if m > 1 else target, keep, False), target

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = batch.get(self.cfg.modality)
        if not isinstance(x, torch.Tensor) or x.shape[0] == 0:
            zero = next(self.decoder.parameters()).sum() * 0.0  # keeps the graph (and DDP) whole
            return {f"{self.name}_loss": zero}
        # under several ranks each encodes its own rows of the gathered batch (local loss)
        own = own_rows(batch, (self.cfg.modality,), x.shape[0])
        loss, target = self.latent_loss(x, own=own)
        return {f"{self.name}_loss": own.share(loss), "target_std": own.share(target.std()).detach()}
