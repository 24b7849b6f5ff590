"""FILIP's token-wise late-interaction similarity (Yao et al. 2021, arXiv:2111.07783), a pure function.

Both the FILIP objective (training) and the `retrieval_late` evaluator use it, with the token
embeddings of `MultimodalModel.token_embeddings`, so training and evaluation score pairs identically.
It lives beside the model because neither the objectives nor evaluation may own it for the other.

The similarity of image i and text j is asymmetric:

    s_i2t[i, j] = mean over image i's tokens k of  max over text j's real tokens r of  <x_ik, y_jr>
    s_t2i[j, i] = mean over text j's real tokens r of  max over image i's tokens k of  <x_ik, y_jr>

Padding tokens are never a max and never in a mean.
"""

from __future__ import annotations

import torch


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
