"""Image-text retrieval recall@k, following CLIP_benchmark's definitions.

Two directions, named as in CLIP_benchmark:

- ``image_retrieval_recall@k`` (text -> image): for each caption, 1 if its image is among the
  top-k images by score; averaged over captions.
- ``text_retrieval_recall@k`` (image -> text): for each image, 1 if any of its captions is among
  the top-k captions by score; averaged over images that have at least one caption.

Tie rule (shared by both functions, so chunked == unchunked exactly) is *pessimistic*: ties with
negatives count against the positive.

- text -> image: hit@k iff the number of other images (negatives) whose score is ``>=`` the
  caption's own image's score is < k.
- image -> text: take the best positive caption score s*; hit@k iff the number of *negative*
  captions (captions of other images) with score ``>= s*`` is < k. The image's other positive
  captions never count against it, tied or not.

Why pessimistic: with the optimistic rule (count only strictly greater scores) a collapsed model
whose embeddings are all identical ties everywhere and scores 100% recall, which is exactly the
failure an evaluation tool must expose. Under this rule it scores the worst case (0 at k=1 whenever
there is a negative). CLIP_benchmark's ``topk`` breaks ties in an implementation-defined way
instead. k at or above the number of candidates is always a hit (a positive has fewer negatives).

Images with no caption cannot be retrieved against and are excluded from the image -> text
average (CLIP_benchmark would count them as misses via 0/0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = list(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    return ks


def _check_index(text_to_image: torch.Tensor, num_texts: int, num_images: int) -> None:
    if text_to_image.dtype != torch.long or text_to_image.dim() != 1:
        raise ValueError(
            f"text_to_image must be a 1-D LongTensor, got dtype={text_to_image.dtype} "
            f"shape={tuple(text_to_image.shape)}"
        )
    if text_to_image.shape[0] != num_texts:
        raise ValueError(
            f"text_to_image has {text_to_image.shape[0]} entries but there are {num_texts} texts"
        )
    if num_texts == 0 or num_images == 0:
        raise ValueError(f"need at least one text and one image, got T={num_texts}, I={num_images}")
    lo, hi = int(text_to_image.min()), int(text_to_image.max())
    if lo < 0 or hi >= num_images:
        raise ValueError(f"text_to_image values must lie in [0, {num_images}), got range [{lo}, {hi}]")


def _check_no_nan(scores: torch.Tensor) -> None:
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")


def _summarise(
    t2i_rank: torch.Tensor,
    i2t_rank: torch.Tensor,
    has_caption: torch.Tensor,
    ks: list[int],
) -> dict[str, float]:
    # t2i_rank: (T,) number of negative images scoring >= each caption's own image.
    # i2t_rank: (I,) number of negative captions scoring >= each image's best positive caption.
    # A rank is at most (#candidates - 1), so k >= #candidates is always a hit without capping k.
    i2t_rank = i2t_rank[has_caption]
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (t2i_rank < k).double().mean().item()
        out[f"text_retrieval_recall@{k}"] = (i2t_rank < k).double().mean().item()
    return out


@torch.no_grad()
def retrieval_metrics(
    scores: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k in both directions from a full (T, I) caption-image similarity matrix.

    ``text_to_image[t]`` is the index of caption t's image; an image may have several captions.
    Returns ``image_retrieval_recall@k`` and ``text_retrieval_recall@k`` for each k, in [0, 1].
    See the module docstring for the tie rule and for images without captions.
    """
    ks = _check_ks(ks)
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (T, I), got shape {tuple(scores.shape)}")
    T, n_img = scores.shape
    text_to_image = text_to_image.to(scores.device)
    _check_index(text_to_image, T, n_img)
    _check_no_nan(scores)

    is_neg = text_to_image[:, None] != torch.arange(n_img, device=scores.device)[None, :]  # (T, I)

    # text -> image: number of negative images scoring >= the caption's own image (ties count against).
    pos = scores.gather(1, text_to_image[:, None])  # (T, 1)
    t2i_rank = ((scores >= pos) & is_neg).sum(dim=1)  # (T,)

    # image -> text: best positive caption per image, then negative captions scoring >= it.
    best = torch.full((n_img,), float("-inf"), dtype=scores.dtype, device=scores.device)
    best = best.scatter_reduce(0, text_to_image, pos[:, 0], reduce="amax", include_self=False)  # (I,)
    i2t_rank = ((scores >= best[None, :]) & is_neg).sum(dim=0)  # (I,)
    has_caption = torch.bincount(text_to_image, minlength=n_img) > 0  # (I,)
    return _summarise(t2i_rank, i2t_rank, has_caption, ks)


def _neg_inf(like: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.full(shape, float("-inf"), dtype=like.dtype, device=like.device)


def _merge_topk(running: torch.Tensor, new: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest values per row of two (R, *) value sets (values only, so ties are harmless)."""
    both = torch.cat([running, new], dim=1)
    return both.topk(min(k, both.shape[1]), dim=1).values


@torch.no_grad()
def chunked_retrieval_metrics(
    text_emb: torch.Tensor,
    image_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 4096,
    score_fn: ScoreFn | None = None,
) -> dict[str, float]:
    """Same numbers as ``retrieval_metrics(score_fn(text_emb, image_emb), ...)`` without the full matrix.

    Scores are computed block by block, (chunk, chunk) at a time; ``score_fn(text_chunk, image_chunk)``
    must return their (t, i) similarities (default: ``text_chunk @ image_chunk.T``). Per caption and per
    image we keep the (best) positive score seen so far and a running top-kmax of *negative* scores
    (positives are masked to -inf before the top-k). The values >= a positive form a top segment, so
    #(top-kmax negatives >= positive) = min(c, kmax) with c = #(all negatives >= positive), and
    min(c, kmax) < k <=> c < k for every k <= kmax. The buffer may also hold -inf fillers (initial
    state, masked positives) when a row has fewer than kmax negatives; they are <= every real value,
    so they only matter when the positive is itself -inf, and then capping the count at the row's
    number of negatives restores c exactly. The result therefore equals the unchunked pessimistic
    rule exactly (given bitwise-identical block scores).
    """
    ks = _check_ks(ks)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if text_emb.dim() != 2 or image_emb.dim() != 2:
        raise ValueError(
            "text_emb and image_emb must be 2-D (N, D), "
            f"got {tuple(text_emb.shape)} and {tuple(image_emb.shape)}"
        )
    if score_fn is None:
        if text_emb.shape[1] != image_emb.shape[1]:
            raise ValueError(
                f"embedding dims differ: text D={text_emb.shape[1]}, image D={image_emb.shape[1]}"
            )
        score_fn = lambda t, i: t @ i.T
    T, n_img = text_emb.shape[0], image_emb.shape[0]
    text_to_image = text_to_image.to(text_emb.device)
    _check_index(text_to_image, T, n_img)
    k_t2i, k_i2t = min(max(ks), n_img), min(max(ks), T)

    t2i_pos = t2i_top = i2t_best = i2t_top = None
    for t0 in range(0, T, chunk):
        tt = text_to_image[t0 : t0 + chunk]  # (t,)
        for i0 in range(0, n_img, chunk):
            block = score_fn(text_emb[t0 : t0 + chunk], image_emb[i0 : i0 + chunk])  # (t, i)
            t, i = tt.shape[0], min(chunk, n_img - i0)
            if block.shape != (t, i):
                raise ValueError(f"score_fn returned shape {tuple(block.shape)}, expected {(t, i)}")
            _check_no_nan(block)
            if t2i_pos is None:  # allocate running state lazily, in the scores' dtype and device
                # The -inf fillers in the top-k buffers are handled by the final cap (see docstring).
                t2i_pos, t2i_top = _neg_inf(block, T), _neg_inf(block, T, k_t2i)
                i2t_best, i2t_top = _neg_inf(block, n_img), _neg_inf(block, n_img, k_i2t)

            is_pos = tt[:, None] == torch.arange(i0, i0 + i, device=tt.device)[None, :]  # (t, i)
            negatives = block.masked_fill(is_pos, float("-inf"))  # positives never count against

            # text -> image: positive score if the caption's image is in this block; running top-k negatives.
            local = tt - i0  # (t,)
            inside = (local >= 0) & (local < i)
            own = block.gather(1, local.clamp(0, i - 1)[:, None])[:, 0]  # (t,) valid where inside
            t2i_pos[t0 : t0 + t] = torch.where(inside, own, t2i_pos[t0 : t0 + t])
            t2i_top[t0 : t0 + t] = _merge_topk(
                t2i_top[t0 : t0 + t], negatives.topk(min(k_t2i, i), dim=1).values, k_t2i
            )

            # image -> text: best positive caption per image in this block; running top-k negative captions.
            positives = block.masked_fill(~is_pos, float("-inf"))
            i2t_best[i0 : i0 + i] = torch.maximum(i2t_best[i0 : i0 + i], positives.amax(dim=0))
            new = negatives.topk(min(k_i2t, t), dim=0).values.T  # (i, <=k)
            i2t_top[i0 : i0 + i] = _merge_topk(i2t_top[i0 : i0 + i], new, k_i2t)

    # Cap each count at the row's number of negatives: drops -inf fillers counted against a -inf positive.
    n_caps = torch.bincount(text_to_image, minlength=n_img)  # (I,)
    t2i_rank = (t2i_top >= t2i_pos[:, None]).sum(dim=1).clamp(max=n_img - 1)  # (T,)
    i2t_rank = torch.minimum((i2t_top >= i2t_best[:, None]).sum(dim=1), T - n_caps)  # (I,)
    return _summarise(t2i_rank, i2t_rank, n_caps > 0, ks)
