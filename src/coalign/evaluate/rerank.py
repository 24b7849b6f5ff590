"""Re-ranking by the fusion part's image-text matching head (ALBEF's and BLIP's inference).

The dual encoder ranks every candidate by cosine similarity; the fusion encoder is far more
expensive (one forward per pair) but reads both sides token by token, which is where attribute
binding ("red triangle" vs "red circle, blue triangle") can be decided. So, as in ALBEF (Li et al.
2021, arXiv:2107.07651, section 4), only each query's top `k` candidates by the dual encoder are
scored by the ITM head, p(match | pair) = softmax(match_head(fused [CLS]))[1], and re-ordered by it;
the candidates below the top k keep their dual-encoder order behind them.

- `retrieval_rerank`: caption <-> sample retrieval. Metrics: CLIP_benchmark's recall names after
  re-ranking (`image_retrieval_recall@k`, `text_retrieval_recall@k`; @1 and @5 headlines) and the
  dual encoder's own as `dual_image_retrieval_recall@k`, `dual_text_retrieval_recall@k`, so one run
  reports before and after. Recalls follow `evaluate/retrieval.py` (its pessimistic tie rule): the
  re-ranked candidates get the score 2 + p (above any cosine), the rest keep their cosine.
- `zero_shot_rerank`: zero-shot classification whose top `k` classes by the dual encoder are
  re-ordered by the ITM score of (class prompt, sample), averaged over the task's templates.
  Metrics `acc1` (headline), `acc5`, `mean_per_class_recall`, and `dual_acc1` before re-ranking.

Both re-read the source as `embed_eval_set` does (the same walk, so rows and captions line up) to
get the towers' token features, which the fusion part reads. Memory: every sample's and caption's
tokens on the CPU (fine for evaluation sets of thousands; a COCO-sized ViT-B set needs a few GB).
"""

from __future__ import annotations

from functools import partial

import pydantic
import torch

from coalign.data.sources.base import SkipCounter
from coalign.evaluate.base import EvalContext, Evaluator, Metric, register
from coalign.evaluate.classification import _fill, class_embeddings, classification_metrics
from coalign.evaluate.embed import EmbeddedSet, eval_batches
from coalign.evaluate.retrieval import Recalls, recall_metrics, retrieval_recalls
from coalign.models.encoders.base import Tokens
from coalign.models.fusion import Fusion, match_scores
from coalign.models.model import MultimodalModel
from coalign.registry import ConfigError, StrictModel


class RerankConfig(StrictModel):
    k: int = pydantic.Field(16, ge=1)  # candidates per query scored by the ITM head (ALBEF: 128 / 256)
    ks: tuple[int, ...] = (1, 5, 10)  # recall@k reported (retrieval only)
    pairs_per_batch: int = pydantic.Field(256, ge=1)  # fused pairs per forward of the fusion part


def fusion_of(model: MultimodalModel | None, evaluator: str) -> Fusion:
    fusion = getattr(model, "fusion", None)
    if fusion is None or "text" not in (fusion.query, fusion.context):
        raise ConfigError(
            f"{evaluator} scores pairs with the ITM head of a text-image fusion part; this model has "
            "none (train a recipe with model.fusion and the itm objective, e.g. albef or uniter)"
        )
    return fusion


def cat_tokens(parts: list[Tokens]) -> Tokens:
    """Token features of many batches of one tower (same length: fixed image size, padded ids)."""
    if not parts:
        return Tokens(torch.zeros(0, 1, 1), None)
    masks = [p.mask for p in parts]
    mask = None if all(m is None for m in masks) else torch.cat(masks)
    return Tokens(torch.cat([p.tokens for p in parts]), mask)


@torch.no_grad()
def tower_tokens(model: MultimodalModel, modality: str, x: torch.Tensor, ctx: EvalContext) -> Tokens:
    """The tower's token features of a batch, on the CPU (what the fusion part reads)."""
    with ctx.runtime.autocast():
        t = model.features(modality, x.to(ctx.runtime.device)).tokens
    return Tokens(t.tokens.float().cpu(), None if t.mask is None else t.mask.cpu())


@torch.no_grad()
def text_tokens(model: MultimodalModel, texts: list[str], ctx: EvalContext) -> Tokens:
    encode = ctx.transforms["text"].encode
    step = ctx.batch_size
    return cat_tokens(
        [tower_tokens(model, "text", encode(texts[i : i + step]), ctx) for i in range(0, len(texts), step)]
    )


@torch.no_grad()
def sample_tokens(eset: EmbeddedSet, ctx: EvalContext, modality: str) -> tuple[Tokens, list[str]]:
    """Token features of the samples that have `modality` (in `eset`'s row order) and every caption."""
    parts, texts = [], []
    walk = eval_batches(
        ctx.source, ctx.transforms, [modality], ctx.batch_size, ctx.max_samples, SkipCounter()
    )
    for values, _, caps, _, _ in walk:
        if modality in values:
            parts.append(tower_tokens(ctx.model, modality, values[modality], ctx))
        texts.extend(t for c in caps for t in c)
    items = cat_tokens(parts)
    n = int(eset.has(modality).sum())
    if len(items.tokens) != n or len(texts) != len(eset.captions):
        raise RuntimeError(
            f"re-encoding '{eset.name}' gave {len(items.tokens)} {modality} samples and {len(texts)} "
            f"captions, but the evaluation embedded {n} and {len(eset.captions)}; the source must "
            "return the same samples on every read"
        )
    return items, texts


def pair_scores(
    fusion: Fusion, texts: Tokens, items: Tokens, text_rows: torch.Tensor, item_rows: torch.Tensor, chunk: int
) -> torch.Tensor:
    """(P,) ITM probabilities of (text, item) pairs, whichever side the fusion part queries from."""
    if fusion.query == "text":
        return match_scores(fusion, texts, items, text_rows, item_rows, chunk)
    return match_scores(fusion, items, texts, item_rows, text_rows, chunk)


def rerank_rows(scores: torch.Tensor, k: int, score_pairs) -> torch.Tensor:
    """`scores` (Q, C) with each row's top k columns replaced by 2 + score_pairs(q_rows, c_rows):
    ordered by the ITM score, all above the remaining columns, which keep their own order."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices  # (Q, k)
    rows = torch.arange(scores.shape[0]).repeat_interleave(k)
    out = scores.clone()
    out[rows, top.flatten()] = 2.0 + score_pairs(rows, top.flatten()).to(out.dtype)
    return out


@register("retrieval_rerank")
class RetrievalRerank(Evaluator):
    """Caption <-> sample retrieval, the dual encoder's top k re-ranked by ITM (module docstring)."""

    needs_fusion = True  # scores pairs with the model's ITM fusion part (tests/test_rerank.py)

    Config = RerankConfig
    task = "zeroshot_retrieval"

    def __call__(self, eset: EmbeddedSet, ctx: EvalContext) -> list[Metric]:
        fusion = fusion_of(ctx.model, self.name)
        modality = fusion.context if fusion.query == "text" else fusion.query
        rows = eset.has(modality)
        if not len(eset.captions) or int(rows.sum()) < 2:
            return []
        items, texts = sample_tokens(eset, ctx, modality)
        captions = text_tokens(ctx.model, texts, ctx)
        # captions of samples without the modality cannot be retrieved against: leave them out
        position = torch.full((len(rows),), -1, dtype=torch.long)
        position[rows] = torch.arange(int(rows.sum()))
        owner = position[eset.caption_owner]  # (T,) the caption's item among the kept items
        keep = owner >= 0
        captions = Tokens(captions.tokens[keep], None if captions.mask is None else captions.mask[keep])
        owner = owner[keep]
        sims = eset.captions[keep].float() @ eset.embeddings[modality][rows].float().T  # (T, I)
        chunk = self.config.pairs_per_batch
        k = self.config.k
        t2i = rerank_rows(sims, k, lambda t, i: pair_scores(fusion, captions, items, t, i, chunk))
        i2t = rerank_rows(sims.T, k, lambda i, t: pair_scores(fusion, captions, items, t, i, chunk)).T
        ks = self.config.ks
        after = Recalls(
            retrieval_recalls(t2i, owner, ks).text_to_image, retrieval_recalls(i2t, owner, ks).image_to_text
        )
        before = retrieval_recalls(sims, owner, ks)
        out = recall_metrics(self, eset, modality, after, "image", "text")
        for k_ in ks:
            for side, value in (("image", before.text_to_image[k_]), ("text", before.image_to_text[k_])):
                out.append(
                    self.metric(eset, modality, None, f"dual_{side}_retrieval_recall@{k_}", value, False)
                )
        return out


def class_scores(
    fusion: Fusion,
    prompts: Tokens,
    items: Tokens,
    n_templates: int,
    chunk: int,
    sample_rows: torch.Tensor,
    class_rows: torch.Tensor,
) -> torch.Tensor:
    """(P,) ITM probability of (sample, class) pairs, the mean over the class's templates (prompts
    are class-major: row class * n_templates + j)."""
    total = torch.zeros(len(sample_rows))
    for j in range(n_templates):
        total += pair_scores(fusion, prompts, items, class_rows * n_templates + j, sample_rows, chunk)
    return total / n_templates


@register("zero_shot_rerank")
class ZeroShotRerank(Evaluator):
    """Zero-shot classification, the dual encoder's top k classes re-ranked by ITM (module docstring)."""

    needs_fusion = True  # scores pairs with the model's ITM fusion part (tests/test_rerank.py)

    Config = RerankConfig
    task = "zeroshot_classification"
    headlines = frozenset({"acc1"})

    def __call__(self, eset: EmbeddedSet, ctx: EvalContext) -> list[Metric]:
        fusion = fusion_of(ctx.model, self.name)
        modality = fusion.context if fusion.query == "text" else fusion.query
        tasks = {key: t for key, t in eset.tasks.items() if key in eset.labels}
        if ctx.encode_text is None or not tasks or int(eset.has(modality).sum()) == 0:
            return []
        items, _ = sample_tokens(eset, ctx, modality)
        chunk = self.config.pairs_per_batch
        out: list[Metric] = []
        for key, task in tasks.items():
            classes = class_embeddings(ctx.encode_text, task.classnames, task.templates)  # (C, E)
            emb, labels = eset.labelled(modality, key)
            logits = emb.float() @ classes.float().T  # (N, C)
            prompts = text_tokens(
                ctx.model, [_fill(t, c) for c in task.classnames for t in task.templates], ctx
            )

            score = partial(class_scores, fusion, prompts, items, len(task.templates), chunk)
            values = classification_metrics(rerank_rows(logits, self.config.k, score), labels)
            out += self.metrics(eset, modality, key, values)
            dual = classification_metrics(logits, labels)["acc1"]
            out.append(self.metric(eset, modality, key, "dual_acc1", dual, False))
        return out
