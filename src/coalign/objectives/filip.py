"""FILIP: contrastive learning on token-wise late interaction (Yao et al. 2021, arXiv:2111.07783).

Every token of both modalities is projected into the shared space by its modality's projection head
and L2-normalised. The similarity of image i and text j is asymmetric:

    s_i2t[i, j] = mean over image i's tokens k of  max over text j's real tokens r of  <x_ik, y_jr>
    s_t2i[j, i] = mean over text j's real tokens r of  max over image i's tokens k of  <x_ik, y_jr>

and the loss is the mean of the image->text cross-entropy over `scale * s_i2t` (rows: images) and the
text->image cross-entropy over `scale * s_t2i` (rows: texts), each with the diagonal as target.
Padding tokens are never a max and never in a mean. The evaluator `retrieval_late` uses the same
`project_tokens` and `late_interaction_scores`, so training and evaluation score pairs identically.
"""

from __future__ import annotations

from typing import Any

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from coalign.data.sample import present_rows
from coalign.models.encoders.base import Tokens
from coalign.models.model import Features
from coalign.objectives.base import LearnedScale, Objective, TemperatureOptions, paired
from coalign.objectives.contrastive import info_nce
from coalign.registry import OBJECTIVES, ConfigError


class FILIPConfig(TemperatureOptions):
    modalities: tuple[str, str] = ("image", "text")  # (the "image" side, the "text" side)
    # Keep the image tower's prefix (CLS) token among the image tokens. FILIP uses patch tokens only.
    image_cls: bool = False
    # Weight of an extra InfoNCE term on the pooled embeddings (same temperature); 0 = FILIP alone.
    weight_global: float = pydantic.Field(0.0, ge=0)
    # Score at most this many texts at once: bounds the (B, Ni, chunk, Nt) similarity block. None = all.
    text_chunk: int | None = pydantic.Field(None, gt=0)


def prefix_tokens(tower: nn.Module) -> int:
    """How many leading tokens of `tower`'s output are not content (a ViT's CLS token)."""
    return int(tower.num_prefix_tokens)


def project_tokens(
    head: nn.Module, tokens: Tokens, skip: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token features -> projected, L2-normalised token embeddings in the shared space.

    tokens.tokens (B, N, D), tokens.mask (B, N) or None; the first `skip` tokens (CLS) are dropped.
    Returns (B, N - skip, E) float32 embeddings and their (B, N - skip) mask (None = all real).
    The head is the same one that projects pooled features, applied to every token (it maps the
    last dimension), so token and pooled embeddings live in one space.
    """
    x, mask = tokens.tokens[:, skip:], None if tokens.mask is None else tokens.mask[:, skip:]
    return F.normalize(head(x).float(), dim=-1), mask


def _max(x: torch.Tensor, dim: int) -> torch.Tensor:
    # Under autograd `.max(dim).values` saves only the arg-max indices for backward (amax would keep
    # the whole similarity block alive); without autograd amax is the faster kernel.
    return x.max(dim=dim).values if torch.is_grad_enabled() else x.amax(dim=dim)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(..., M) -> (...,): mean over the real entries of the last axis; `mask` broadcasts to x.

    An entry is -inf when the other side had no real token at all; it counts as similarity 0.
    """
    x = x.masked_fill(torch.isneginf(x), 0.0)
    if mask is None:
        return x.mean(dim=-1)
    w = mask.to(x.dtype)
    return (x * w).sum(dim=-1) / w.sum(dim=-1).clamp_min(1.0)


def late_interaction_scores(
    img_tok: torch.Tensor,
    img_mask: torch.Tensor | None,
    txt_tok: torch.Tensor,
    txt_mask: torch.Tensor | None,
    text_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FILIP's two token-wise similarities between every image and every text.

    img_tok (Bi, Ni, E), txt_tok (Bt, Nt, E): normalised token embeddings; masks (B, N) bool,
    True = real token, None = all real. Returns s_i2t (Bi, Bt) and s_t2i (Bt, Bi).
    `text_chunk` scores that many texts at a time, so the (Bi, Ni, chunk, Nt) block bounds memory.
    """
    if img_tok.dim() != 3 or txt_tok.dim() != 3 or img_tok.shape[-1] != txt_tok.shape[-1]:
        raise ValueError(
            f"need (B, N, E) token embeddings of one width, got {tuple(img_tok.shape)} and "
            f"{tuple(txt_tok.shape)}"
        )
    # At least fp32, even under autocast: bf16 keeps ~3 digits of a cosine, ~0.4 at logit scale 100.
    with torch.autocast(img_tok.device.type, enabled=False):
        return _scores(_at_least_fp32(img_tok), img_mask, _at_least_fp32(txt_tok), txt_mask, text_chunk)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _scores(
    img_tok: torch.Tensor,
    img_mask: torch.Tensor | None,
    txt_tok: torch.Tensor,
    txt_mask: torch.Tensor | None,
    text_chunk: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    (Bi, Ni, E), Nt = img_tok.shape, txt_tok.shape[1]
    i2t, t2i = [], []
    step = text_chunk or max(txt_tok.shape[0], 1)
    for t0 in range(0, txt_tok.shape[0], step):
        txt = txt_tok[t0 : t0 + step]
        tm = None if txt_mask is None else txt_mask[t0 : t0 + step]
        bt = txt.shape[0]
        # One GEMM over all token pairs, laid out (Bi, Ni, bt, Nt) as it comes out.
        sim = (img_tok.reshape(Bi * Ni, E) @ txt.reshape(bt * Nt, E).T).view(Bi, Ni, bt, Nt)
        pad = None if tm is None else ~tm[None, None]  # (1, 1, bt, Nt)
        if img_mask is not None:
            ipad = ~img_mask[:, :, None, None]  # (Bi, Ni, 1, 1)
            pad = ipad if pad is None else pad | ipad
        if pad is not None:
            # -inf at every pair that touches padding: never a max in either direction. In place, as
            # the matmul's backward needs only its inputs, not this output.
            sim = sim.masked_fill_(pad, float("-inf"))
        # image -> text: per image token its best text token, averaged over real image tokens.
        best_txt = _max(sim, 3).transpose(1, 2)  # (Bi, bt, Ni)
        i2t.append(_masked_mean(best_txt, None if img_mask is None else img_mask[:, None, :]))  # (Bi, bt)
        # text -> image: per text token its best image token, averaged over real text tokens.
        best_img = _max(sim, 1).transpose(0, 1)  # (bt, Bi, Nt)
        t2i.append(_masked_mean(best_img, None if tm is None else tm[:, None, :]))  # (bt, Bi)
    if not i2t:
        return img_tok.new_zeros(Bi, 0), img_tok.new_zeros(0, Bi)
    return torch.cat(i2t, dim=1), torch.cat(t2i, dim=0)


def filip_loss(
    img_tok: torch.Tensor,
    img_mask: torch.Tensor | None,
    txt_tok: torch.Tensor,
    txt_mask: torch.Tensor | None,
    logit_scale: torch.Tensor,
    text_chunk: int | None = None,
) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies over in-batch pairs (row i <-> row i)."""
    s_i2t, s_t2i = late_interaction_scores(img_tok, img_mask, txt_tok, txt_mask, text_chunk)
    target = torch.arange(s_i2t.shape[0], device=s_i2t.device)
    return 0.5 * (F.cross_entropy(logit_scale * s_i2t, target) + F.cross_entropy(logit_scale * s_t2i, target))


def _paired_tokens(ta: Tokens, tb: Tokens, batch: dict[str, Any], a: str, b: str) -> tuple[Tokens, Tokens]:
    """The token rows of the samples that have both modalities, row-aligned (as `paired` does for
    embeddings: each modality's features cover only the rows where it is present)."""

    def pick(t: Tokens, rows: torch.Tensor | None) -> Tokens:
        if rows is None:
            return t
        rows = rows.to(t.tokens.device)
        return Tokens(t.tokens[rows], None if t.mask is None else t.mask[rows])

    rows_a, rows_b = present_rows(batch, (a, b))
    return pick(ta, rows_a), pick(tb, rows_b)


@OBJECTIVES.register("filip")
class FILIP(LearnedScale, Objective):
    Config = FILIPConfig
    name = "filip"

    def __init__(self, cfg: FILIPConfig | None = None, **kwargs: Any):
        super().__init__(cfg, **kwargs)
        self.init_scale(1.0 / self.cfg.init_temperature, self.cfg.max_logit_scale, self.cfg.learn_temperature)
        self._image_skip = 0  # leading image tokens to drop; set by bind from the image tower

    def bind(self, model: nn.Module, transforms: dict[str, Any] | None = None) -> None:
        missing = [m for m in self.cfg.modalities if m not in model.towers]
        if missing:
            raise ConfigError(
                f"filip: modalities {list(self.cfg.modalities)}: the model has no tower for {missing}; "
                f"towers: {', '.join(model.towers)}"
            )
        # The heads belong to the model; object.__setattr__ keeps nn.Module from registering them a
        # second time here (they would appear twice in the Task's parameters and state_dict).
        object.__setattr__(self, "_heads", model.heads)
        self._image_skip = 0 if self.cfg.image_cls else prefix_tokens(model.towers[self.cfg.modalities[0]])

    def forward(self, features: dict[str, Features], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        heads = self.__dict__.get("_heads")
        if heads is None:
            raise RuntimeError("filip: call bind(model) before using the objective (Task.from_specs does)")
        a, b = self.cfg.modalities
        for m in (a, b):
            if m not in features:
                raise KeyError(f"objective 'filip' needs modality '{m}'; the batch has {sorted(features)}")
        ta, tb = _paired_tokens(features[a].tokens, features[b].tokens, batch, a, b)
        xa, ma = project_tokens(heads[a], ta, self._image_skip)  # (M, Na, E)
        xb, mb = project_tokens(heads[b], tb)  # (M, Nb, E)
        scale = self.scale()
        local = filip_loss(xa, ma, xb, mb, scale, self.cfg.text_chunk)
        out = {"logit_scale": scale.detach()}
        if self.cfg.weight_global > 0:
            ea, eb = paired(features, batch, a, b)
            glob = info_nce(ea, eb, scale)
            out.update({"local": local.detach(), "global": glob.detach()})
            local = local + self.cfg.weight_global * glob
        out["filip_loss"] = local
        return out
