"""Retrieval recall@k, following CLIP_benchmark's definitions, and the `retrieval` evaluator.

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
from dataclasses import dataclass

import torch

from coalign.evaluate.base import EvalContext, Evaluator, Metric, register
from coalign.evaluate.embed import EmbeddedSet

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Recalls:
    """Recall@k in both directions: `text_to_image[k]` (CLIP_benchmark's ``image_retrieval_recall@k``,
    the caption is the query) and `image_to_text[k]` (``text_retrieval_recall@k``)."""

    text_to_image: dict[int, float]
    image_to_text: dict[int, float]

    def named(self) -> dict[str, float]:
        """CLIP_benchmark's names, k by k: ``image_retrieval_recall@k``, ``text_retrieval_recall@k``."""
        out: dict[str, float] = {}
        for k in self.text_to_image:
            out[f"image_retrieval_recall@{k}"] = self.text_to_image[k]
            out[f"text_retrieval_recall@{k}"] = self.image_to_text[k]
        return out


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
) -> Recalls:
    # t2i_rank: (T,) number of negative images scoring >= each caption's own image.
    # i2t_rank: (I,) number of negative captions scoring >= each image's best positive caption.
    # A rank is at most (#candidates - 1), so k >= #candidates is always a hit without capping k.
    i2t_rank = i2t_rank[has_caption]
    t2i = {k: (t2i_rank < k).double().mean().item() for k in ks}
    i2t = {k: (i2t_rank < k).double().mean().item() for k in ks}
    return Recalls(t2i, i2t)


@torch.no_grad()
def retrieval_metrics(
    scores: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k in both directions from a full (T, I) caption-image similarity matrix.

    ``text_to_image[t]`` is the index of caption t's image; an image may have several captions.
    Returns ``image_retrieval_recall@k`` and ``text_retrieval_recall@k`` for each k, in [0, 1].
    See the module docstring for the tie rule and for images without captions.
    """
    return retrieval_recalls(scores, text_to_image, ks).named()


@torch.no_grad()
def retrieval_recalls(
    scores: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> Recalls:
    """`retrieval_metrics` as a `Recalls` record."""
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


def chunked_retrieval_metrics(*args, **kwargs) -> dict[str, float]:
    """`chunked_retrieval_recalls(...)` as a dict of CLIP_benchmark names (same arguments)."""
    return chunked_retrieval_recalls(*args, **kwargs).named()


@torch.no_grad()
def chunked_retrieval_recalls(
    text_emb: torch.Tensor,
    image_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 4096,
    score_fn: ScoreFn | None = None,
) -> Recalls:
    """Same numbers as ``retrieval_recalls(score_fn(text_emb, image_emb), ...)`` without the full matrix.

    Scores are computed block by block, (chunk, chunk) at a time; ``score_fn(text_chunk, image_chunk)``
    must return their (t, i) similarities (default: ``text_chunk @ image_chunk.T``). Two passes:

    1. Positive scores. Captions are visited grouped by their image (a stable sort of
       ``text_to_image``), so the positives of one caption chunk lie in one or two image blocks, and
       only those blocks are computed: each caption's own-image score, then per image its best
       caption score and how many of its captions reach it.
    2. Counts. Every block again; per caption, how many images score >= its positive; per image,
       how many captions score >= its best positive. Subtracting the positives that are counted (the
       caption's own image; the image's captions that tie its best) leaves exactly the number of
       negatives at or above the positive: the pessimistic rank.

    Both passes cut the same blocks from the same inputs, so a positive is bitwise the value it is
    compared with (ties, e.g. of a collapsed model, are decided exactly as in `retrieval_metrics`).
    Memory: O(T + I) state plus one block; time: about twice the matmul of the full matrix, but only
    comparisons and sums per block (no top-k), so it runs at matmul speed.
    """
    ks = _check_ks(ks)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if text_emb.dim() != 2 or image_emb.dim() != 2:
        raise ValueError(
            "text_emb and image_emb must be 2-D (N, D), "
            f"got {tuple(text_emb.shape)} and {tuple(image_emb.shape)}"
        )
    check_blocks = score_fn is not None
    if score_fn is None:
        if text_emb.shape[1] != image_emb.shape[1]:
            raise ValueError(
                f"embedding dims differ: text D={text_emb.shape[1]}, image D={image_emb.shape[1]}"
            )
        if torch.isnan(text_emb).any() or torch.isnan(image_emb).any():
            raise ValueError("scores contain NaN (the embeddings do)")
        score_fn = lambda t, i: t @ i.T
    T, n_img = text_emb.shape[0], image_emb.shape[0]
    text_to_image = text_to_image.to(text_emb.device)
    _check_index(text_to_image, T, n_img)
    order = torch.argsort(text_to_image, stable=True)  # captions grouped by image
    owner = text_to_image[order]  # (T,) non-decreasing
    sorted_already = bool((order == torch.arange(T, device=order.device)).all())

    def caption_chunk(t0: int) -> torch.Tensor:
        return text_emb[t0 : t0 + chunk] if sorted_already else text_emb[order[t0 : t0 + chunk]]

    def block(texts: torch.Tensor, i0: int) -> torch.Tensor:
        out = score_fn(texts, image_emb[i0 : i0 + chunk])
        expected = (texts.shape[0], min(chunk, n_img - i0))
        if out.shape != expected:
            raise ValueError(f"score_fn returned shape {tuple(out.shape)}, expected {expected}")
        if check_blocks:
            _check_no_nan(out)
        return out

    # Pass 1: each caption's positive score, from the blocks that hold it.
    pos = None
    for t0 in range(0, T, chunk):
        texts, own = caption_chunk(t0), owner[t0 : t0 + chunk]
        first, last = int(own[0]) // chunk, int(own[-1]) // chunk
        for b in range(first, last + 1):
            scores = block(texts, b * chunk)  # (t, i)
            if pos is None:
                pos = torch.empty(T, dtype=scores.dtype, device=scores.device)
            inside = own // chunk == b
            rows = inside.nonzero()[:, 0]
            pos[t0 + rows] = scores[rows, own[rows] - b * chunk]
    assert pos is not None
    best = torch.full((n_img,), float("-inf"), dtype=pos.dtype, device=pos.device)
    best = best.scatter_reduce(0, owner, pos, reduce="amax", include_self=False)  # (I,)
    ties_best = torch.bincount(owner[pos == best[owner]], minlength=n_img)  # (I,) own captions == best

    # Pass 2: how many images / captions reach each positive.
    t2i_count = torch.zeros(T, dtype=torch.long, device=pos.device)
    i2t_count = torch.zeros(n_img, dtype=torch.long, device=pos.device)
    for t0 in range(0, T, chunk):
        texts = caption_chunk(t0)
        threshold = pos[t0 : t0 + chunk, None]  # (t, 1)
        for i0 in range(0, n_img, chunk):
            scores = block(texts, i0)
            # int32 partial sums (a block has at most `chunk` rows) are about twice as fast as int64
            t2i_count[t0 : t0 + chunk] += (scores >= threshold).sum(dim=1, dtype=torch.int32)
            i2t_count[i0 : i0 + chunk] += (scores >= best[None, i0 : i0 + chunk]).sum(
                dim=0, dtype=torch.int32
            )

    t2i_rank = t2i_count - 1  # the caption's own image scores exactly `pos`
    i2t_rank = i2t_count - ties_best  # the image's captions that reach its best are positives
    has_caption = torch.bincount(text_to_image, minlength=n_img) > 0
    return _summarise(t2i_rank, i2t_rank, has_caption, ks)


# --------------------------------------------------------------------------------------------- evaluator

HEADLINE_KS = (1, 5)  # recall@1 and @5 are the headline numbers of every retrieval evaluator


def _galleries(eset: EmbeddedSet) -> list[str]:
    return sorted(m for m in eset.embeddings if bool(eset.has(m).any()))


def caption_recalls(eset: EmbeddedSet, modality: str, device: torch.device) -> Recalls | None:
    """Captions <-> the samples that have `modality`; captions of samples without it are left out."""
    rows = eset.has(modality)
    keep = rows[eset.caption_owner]  # (T,) captions whose sample has the modality
    if not bool(keep.any()):
        return None
    new_index = torch.cumsum(rows.long(), 0) - 1  # sample index -> row among the kept samples
    owner = new_index[eset.caption_owner[keep]]
    texts, items = eset.captions[keep].to(device), eset.embeddings[modality][rows].to(device)
    return chunked_retrieval_recalls(texts, items, owner)


def recall_metrics(
    evaluator: Evaluator, eset: EmbeddedSet, target: str, recalls: Recalls, retrieved: str, other: str
) -> list[Metric]:
    """`<retrieved>_retrieval_recall@k` from `recalls.text_to_image`, `<other>_retrieval_recall@k` from
    the other direction, k by k as CLIP_benchmark lists them; @1 and @5 are headlines."""
    out = []
    for k in recalls.text_to_image:
        for side, value in ((retrieved, recalls.text_to_image[k]), (other, recalls.image_to_text[k])):
            name = f"{side}_retrieval_recall@{k}"
            out.append(evaluator.metric(eset, target, None, name, value, headline=k in HEADLINE_KS))
    return out


@register("retrieval")
class Retrieval(Evaluator):
    """Retrieval between every pair of modalities the model has, CLIP_benchmark's definitions.

    Captions <-> each modality m: target m, `image_retrieval_recall@k` (caption -> m's item) and
    `text_retrieval_recall@k` (m's item -> caption), CLIP_benchmark's names ("image" is the non-text
    side). Two non-text modalities a, b: target `a-b`, `<x>_retrieval_recall@k` for retrieving x's
    item given the other modality's item as the query.
    """

    task = "zeroshot_retrieval"

    def __call__(self, eset: EmbeddedSet, ctx: EvalContext) -> list[Metric]:
        device = ctx.runtime.device
        galleries = _galleries(eset)
        out: list[Metric] = []
        for modality in galleries if len(eset.captions) else []:
            recalls = caption_recalls(eset, modality, device)
            if recalls is not None:
                out += recall_metrics(self, eset, modality, recalls, "image", "text")
        for i, a in enumerate(galleries):
            for b in galleries[i + 1 :]:
                rows = eset.has(a, b)
                if int(rows.sum()) < 2:
                    continue
                queries, items = eset.embeddings[a][rows].to(device), eset.embeddings[b][rows].to(device)
                recalls = chunked_retrieval_recalls(queries, items, torch.arange(int(rows.sum())))
                out += recall_metrics(self, eset, f"{a}-{b}", recalls, b, a)  # a queries b, b queries a
        return out
