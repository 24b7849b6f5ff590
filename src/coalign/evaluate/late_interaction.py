"""Retrieval scored by FILIP's token-wise late interaction instead of pooled-embedding cosine.

The pooled embeddings the suite computes are not enough here, so the evaluator re-reads the source
exactly as `embed_eval_set` does (same samples, same skips, so caption ownership matches), keeps every
sample's and every caption's token embeddings (`MultimodalModel.token_embeddings`, as FILIP trains
them), and scores blocks of (caption, sample) pairs with `models.late_interaction_scores`, the
function the FILIP objective trains with:

- text -> image (`image_retrieval_recall@k`) ranks samples by s_t2i (mean over the caption's tokens);
- image -> text (`text_retrieval_recall@k`) ranks captions by s_i2t (mean over the sample's tokens).

Recalls follow CLIP_benchmark's definitions and the tie rule of `evaluate/retrieval.py`. One pass
over bounded blocks of pairs fills both (captions, samples) score matrices; memory is those two
matrices (8 bytes per caption-sample pair: 1 GB for COCO's 25k captions x 5k images).
"""

from __future__ import annotations

import math

import torch

from coalign.data.sources.base import SkipCounter
from coalign.evaluate.base import EvalContext, Evaluator, Metric, register
from coalign.evaluate.embed import EmbeddedSet, eval_batches
from coalign.evaluate.retrieval import Recalls, recall_metrics, retrieval_recalls
from coalign.models.late_interaction import late_interaction_scores

# Elements of one (texts, samples, sample tokens, text tokens) similarity block: 2**24 floats = 64 MiB.
BLOCK_ELEMENTS = 2**24


class TokenSet:
    """Projected, normalised token embeddings of many items: (N, L, E) and their (N, L) mask."""

    def __init__(self, tokens: torch.Tensor, mask: torch.Tensor):
        self.tokens, self.mask = tokens, mask
        self.all_real = bool(mask.all())

    @classmethod
    def cat(cls, parts: list[tuple[torch.Tensor, torch.Tensor | None]], dim: int) -> TokenSet:
        """Concatenate batches that may differ in length, padding each to the longest real length."""
        if not parts:
            return cls(torch.zeros(0, 1, dim), torch.zeros(0, 1, dtype=torch.bool))
        masks = [torch.ones(x.shape[:2], dtype=torch.bool) if m is None else m.cpu() for x, m in parts]
        # Text is padded to the context length; trailing columns no item uses are pure cost, drop them.
        length = max(int(m.any(0).nonzero().max()) + 1 if m.any() else 1 for m in masks)
        tokens = torch.zeros(sum(len(x) for x, _ in parts), length, dim)
        mask = torch.zeros(tokens.shape[:2], dtype=torch.bool)
        row = 0
        for (x, _), m in zip(parts, masks, strict=True):
            n = min(x.shape[1], length)
            tokens[row : row + len(x), :n] = x[:, :n].cpu()
            mask[row : row + len(x), :n] = m[:, :n]
            row += len(x)
        return cls(tokens, mask)

    def to(self, device: torch.device) -> TokenSet:
        return TokenSet(self.tokens.to(device), self.mask.to(device))

    def take(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(n, L, E) tokens and (n, L) mask of some rows; mask None when every token is real (the
        scorer then skips masking)."""
        return self.tokens[rows], None if self.all_real else self.mask[rows]


@torch.no_grad()
def encode_tokens(eset: EmbeddedSet, ctx: EvalContext) -> tuple[dict[str, TokenSet], TokenSet]:
    """{modality: TokenSet over the kept samples}, TokenSet over every caption, in embed_eval_set's order.

    Token embeddings as FILIP trains them by default: each modality's content tokens (no CLS)."""
    model, transforms, runtime = ctx.model, ctx.transforms, ctx.runtime
    modalities = [m for m in model.modalities if m != "text" and m in transforms]
    parts: dict[str, list] = {m: [] for m in [*modalities, "text"]}
    texts: list[str] = []
    batches = eval_batches(ctx.source, transforms, modalities, ctx.batch_size, ctx.max_samples, SkipCounter())
    for values, _, caps, _, _ in batches:  # the same walk as embed_eval_set: samples and captions line up
        for m in modalities:
            with runtime.autocast():
                parts[m].append(model.token_embeddings(m, values[m].to(runtime.device)))
        texts.extend(t for c in caps for t in c)
    for i in range(0, len(texts), ctx.batch_size):
        ids = transforms["text"].encode(texts[i : i + ctx.batch_size]).to(runtime.device)
        with runtime.autocast():
            parts["text"].append(model.token_embeddings("text", ids))
    sets = {m: TokenSet.cat(parts[m], model.embed_dim) for m in parts}
    captions = sets.pop("text")
    for m, s in sets.items():
        if len(s.tokens) != len(eset.embeddings[m]) or len(captions.tokens) != len(eset.captions):
            raise RuntimeError(
                f"retrieval_late: re-encoding '{eset.name}' gave {len(s.tokens)} {m} samples and "
                f"{len(captions.tokens)} captions, but the suite embedded {len(eset.embeddings[m])} and "
                f"{len(eset.captions)}; the source must return the same samples on every read"
            )
    return sets, captions


@torch.no_grad()
def late_score_matrices(
    items: TokenSet, captions: TokenSet, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, I) s_t2i and (T, I) s_i2t transposed, filled block by block: one matmul per block gives
    both directions. Memory: the two score matrices (8 T I bytes) plus one bounded block."""
    items, captions = items.to(device), captions.to(device)
    T, n = len(captions.tokens), len(items.tokens)
    chunk = max(1, math.isqrt(BLOCK_ELEMENTS // (items.tokens.shape[1] * captions.tokens.shape[1])))
    t2i = torch.empty(T, n, device=device)
    i2t = torch.empty(T, n, device=device)
    for t0 in range(0, T, chunk):
        rows = slice(t0, t0 + chunk)
        for i0 in range(0, n, chunk):
            cols = slice(i0, i0 + chunk)
            s_i2t, s_t2i = late_interaction_scores(*items.take(cols), *captions.take(rows))
            t2i[rows, cols], i2t[rows, cols] = s_t2i, s_i2t.T
    return t2i, i2t


def late_recalls(items: TokenSet, captions: TokenSet, owner: torch.Tensor, device: torch.device) -> Recalls:
    """CLIP_benchmark recalls: text -> image ranked by s_t2i, image -> text ranked by s_i2t.

    `retrieval_recalls` reads both directions off one (T, I) matrix; it is called once per matrix
    and each call gives only the direction that its matrix scores.
    """
    t2i, i2t = late_score_matrices(items, captions, device)
    owner = owner.to(device)
    return Recalls(retrieval_recalls(t2i, owner).text_to_image, retrieval_recalls(i2t, owner).image_to_text)


@register("retrieval_late")
class RetrievalLate(Evaluator):
    """Caption <-> sample retrieval by late interaction. Target: the modality; metrics as `retrieval`'s
    caption metrics (`image_retrieval_recall@k`, `text_retrieval_recall@k`; @1 and @5 the headlines)."""

    task = "zeroshot_retrieval"

    def __call__(self, eset: EmbeddedSet, ctx: EvalContext) -> list[Metric]:
        out: list[Metric] = []
        if not len(eset.captions) or "text" not in ctx.transforms or "text" not in ctx.model.towers:
            return out
        samples, captions = encode_tokens(eset, ctx)
        for modality, items in samples.items():
            if len(items.tokens):
                recalls = late_recalls(items, captions, eset.caption_owner, ctx.runtime.device)
                out += recall_metrics(self, eset, modality, recalls, "image", "text")
        return out
