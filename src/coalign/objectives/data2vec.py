"""Latent targets from an EMA teacher (data2vec, Baevski et al. 2022, arXiv:2202.03555; data2vec
2.0, arXiv:2212.07525; EVA-style feature prediction) for any patch tower.

The teacher is an `EMA` (models/ema.py) of the tower: it sees the *full* input, in eval mode, and
its targets are the average of its top-K blocks' outputs, each instance-normalised first (per
sample and channel, over the patches: data2vec's `instance_norm_target_layer`), at every content
patch (prefix tokens such as a CLS are left out):

    y_p = 1/K sum_{l in top K} IN(f_l)_p         f_l: block l's feed-forward output (B, P, D), before
                                                  its residual add, as data2vec reads it

The student is the tower itself on the *masked* input: it encodes a random (1 - mask_ratio) of the
patches through the tower's masking path (models/masking.py, the keep path of FLIP and MAE), and
the light decoder of MAE (mask tokens at the hidden patches, the patches' positions, a small
transformer) predicts y at every patch. The loss is the mean squared error at the *hidden* patches
only (data2vec 2.0's L2 loss, averaged over the channels).

The teacher's parameters have requires_grad=False (never in the optimizer); it is a submodule of
the objective, so checkpoints hold it (`objectives.<i>.teacher.shadow.*`) and resume restores it
exactly; it moves towards the tower after each optimizer step (`after_step`, called by the Task).
The decay is constant (`momentum`); data2vec anneals it towards 1 over training.
"""

from __future__ import annotations

from typing import Any

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from coalign.models.ema import EMA
from coalign.models.masking import random_keep
from coalign.models.model import Features
from coalign.objectives.base import Objective
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
    momentum: float = pydantic.Field(0.999, ge=0.0, lt=1.0)  # the teacher's EMA decay
    instance_norm: bool = True  # each block's output instance-normalised before the average

    @classmethod
    def tiny(cls) -> dict:
        return {**DecoderOptions.tiny(), "top_k": 1}


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
        object.__setattr__(self, "_tower", tower)  # the model's (the Task's): not registered twice
        self.teacher = EMA(tower, self.cfg.momentum)  # a submodule: checkpointed, out of the optimizer
        probe = probe_patches(tower)
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

    def after_step(self) -> None:
        """After each optimizer step: the teacher moves towards the tower."""
        self.teacher.update(self._tower)

    def targets(self, x: Any) -> torch.Tensor:
        """(B, P, D) the teacher's targets for every content patch of the full input."""
        shadow = self.teacher.shadow
        skip = int(shadow.num_prefix_tokens)
        layers = block_outputs(shadow, x, self.cfg.top_k)
        return layer_targets([y[:, skip:] for y in layers], self.cfg.instance_norm)

    def predict(self, x: Any, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the student's predictions (B, P, D) at every patch, keep (B, K))."""
        tower = self._tower
        patches = tower.patches(x)
        if keep is None:
            B, P = patches.tokens.shape[:2]
            keep = random_keep(B, P, self.cfg.mask_ratio, patches.tokens.device)
        tokens = tower.encode_patches(patches.tokens, keep).tokens  # (B, prefix + K, D)
        return self.decoder(tokens, keep, patches), keep

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = batch.get(self.cfg.modality)
        if not isinstance(x, torch.Tensor) or x.shape[0] == 0:
            zero = next(self.decoder.parameters()).sum() * 0.0  # keeps the graph (and DDP) whole
            return {f"{self.name}_loss": zero}
        target = self.targets(x)
        pred, keep = self.predict(x)
        loss = patch_loss(pred, target, keep, norm=False)
        return {f"{self.name}_loss": loss, "target_std": target.std().detach()}
