"""Pairwise sigmoid loss between two modalities (SigLIP, Zhai et al. 2023), plain and chunked.

Every pair (i, j) of the batch is an independent binary classification: positive when i == j,
negative otherwise. With logits x_ij = scale * a_i . b_j + bias and labels z_ij = +-1,

    L = -(1/B) sum_{i,j} log sigmoid(z_ij x_ij) = (1/B) sum_{i,j} softplus(-z_ij x_ij)

(normalised by B, as OpenCLIP does). The sum splits over column blocks of b, so the chunked form
only ever holds a (B, chunk) block of logits, in the forward and (through per-block checkpointing)
in the backward.
"""

from __future__ import annotations

from typing import Any

import pydantic
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from coalign.models.model import Features
from coalign.objectives.base import LearnedScale, Objective, ObjectiveConfig, paired
from coalign.registry import OBJECTIVES


class SigLIPConfig(ObjectiveConfig):
    modalities: tuple[str, str] = ("image", "text")
    init_logit_scale: float = pydantic.Field(10.0, gt=0)  # SigLIP: t' = ln 10, so the scale starts at 10
    init_logit_bias: float = -10.0  # starts every pair near "negative", as ~all B^2 - B pairs are
    max_logit_scale: float = pydantic.Field(100.0, gt=0)  # the clamp OpenCLIP's trainer applies to all
    learn_temperature: bool = True
    learn_bias: bool = True
    chunk_size: int | None = pydantic.Field(None, gt=0)  # columns of b per block; None = the plain loss


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"siglip needs row-aligned (B, E) embeddings, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _block_loss(
    scaled_a: torch.Tensor, b_block: torch.Tensor, bias: torch.Tensor, start: int
) -> torch.Tensor:
    """sum over one column block of -log sigmoid(z_ij x_ij); the block holds columns start.. of b.

    `scaled_a` is scale * a: scaling the (B, E) side rather than the logits means autograd keeps
    no (B, chunk) product around just for the scale's gradient.
    """
    # Under autocast the matmul runs in bf16/fp16; the bias, softplus and the sum over B * chunk
    # terms still run in (at least) fp32, as cross_entropy does for InfoNCE.
    x = (scaled_a @ b_block.T).to(torch.promote_types(scaled_a.dtype, torch.float32)) + bias  # (B, chunk)
    # Positives (i == j) sit at rows start + k, columns k. Flipping their sign in place gives
    # -z * x without a (B, chunk) label matrix, and softplus keeps both tails exact (unlike
    # softplus(x) - x for the positives, which loses precision once x is large).
    x.diagonal(-start).neg_()
    return F.softplus(x).sum()  # softplus(-z x) = -log sigmoid(z x)


def siglip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SigLIP loss of row-aligned a, b: (B, E) (normalised); `scale` is the exponentiated temperature.

    Materialises the full (B, B) logits; `chunked_siglip_loss` gives the same value and gradient
    in (B, chunk) memory. An empty batch gives 0 (a sum of no terms), not NaN.
    """
    _check(a, b)
    return _block_loss(scale * a, b, bias, 0) / max(a.shape[0], 1)


def chunked_siglip_loss(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, chunk: int
) -> torch.Tensor:
    """`siglip_loss` computed over column blocks of b, holding at most (B, chunk) logits at a time.

    Each block is checkpointed: its forward keeps only its inputs (scale * a, a view of b, bias) and
    its backward recomputes that block's logits, so the backward too peaks at one block rather
    than keeping every block's logits alive until the end. The price is one extra (B, chunk) matmul
    per block in the backward.
    """
    _check(a, b)
    if chunk <= 0:
        raise ValueError(f"chunk must be a positive number of columns, got {chunk}")
    needs_graph = torch.is_grad_enabled() and any(t.requires_grad for t in (a, b, scale, bias))
    scaled_a = scale * a  # (B, E), shared by every block
    total = None
    # An empty batch still runs one (empty) block, so its zero loss stays attached to the graph.
    for start in range(0, b.shape[0], chunk) or [0]:
        block = b[start : start + chunk]  # (chunk, E) view, no copy
        if needs_graph:
            # No randomness inside a block, so there is no RNG state to stash and restore.
            part = checkpoint(
                _block_loss, scaled_a, block, bias, start, use_reentrant=False, preserve_rng_state=False
            )
        else:
            part = _block_loss(scaled_a, block, bias, start)
        total = part if total is None else total + part
    return total / max(a.shape[0], 1)


@OBJECTIVES.register("siglip")
class SigLIP(LearnedScale, Objective):
    Config = SigLIPConfig
    name = "siglip"

    def __init__(self, cfg: SigLIPConfig | None = None, **kwargs: Any):
        super().__init__(cfg, **kwargs)
        self.init_scale(self.cfg.init_logit_scale, self.cfg.max_logit_scale, self.cfg.learn_temperature)
        self.logit_bias = nn.Parameter(
            torch.tensor(self.cfg.init_logit_bias), requires_grad=self.cfg.learn_bias
        )

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        a, b = paired(features, batch, *self.cfg.modalities)
        scale, bias = self.scale(), self.logit_bias
        if self.cfg.chunk_size is None:
            loss = siglip_loss(a, b, scale, bias)
        else:
            loss = chunked_siglip_loss(a, b, scale, bias, self.cfg.chunk_size)
        return {"siglip_loss": loss, "logit_scale": scale.detach(), "logit_bias": bias.detach()}
