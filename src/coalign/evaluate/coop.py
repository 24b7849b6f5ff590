"""CoOp: few-shot classification by learning the prompt instead of writing it.

Zhou et al., "Learning to Prompt for Vision-Language Models" (IJCV 2022). Zero-shot classification
depends on hand-written templates ("a photo of a {}."); CoOp replaces the template words with M
learnable vectors in the text encoder's input embedding space and fits only those vectors on k
labelled shots per class, both encoders frozen:

    prompt_c = [<bos>, v_1, ..., v_M, tokens(classname_c), <eos>]
    class_c  = normalize(head(pool(text_encoder(prompt_c))))             # (C, E)
    loss     = cross_entropy(logit_scale * image_emb @ class.T, labels)

Class embeddings go through the model's own text path (`MultimodalModel.features`: pool, head,
L2-normalise), so they live in the same space as zero-shot ones and classify the same stored image
embeddings. The context is shared by every class (the default, "unified") or one per class
(`class_specific`, better with many shots, worse with few).

Logit scale: the learnt temperature belongs to the training objective, not to the
`MultimodalModel` an evaluator receives, so it is an option, 100 by default: CLIP's trained value
(it saturates at its clamp) and the one CoOp uses.
"""

from __future__ import annotations

import math

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from coalign.data.transforms.base import Transform
from coalign.evaluate.base import EvalContext, FittedEvaluator, register
from coalign.evaluate.classification import chunked_classification_metrics
from coalign.evaluate.embed import EmbeddedSet
from coalign.evaluate.linear_probe import sample_shots
from coalign.models.model import MultimodalModel
from coalign.registry import ConfigError, StrictModel
from coalign.runtime import Runtime


class CoOpOptions(StrictModel):
    """The `coop` evaluator's options (CoOp's defaults: 16 shots, 4 context words, SGD at 0.002)."""

    shots: int | None = pydantic.Field(16, ge=1)  # per class; None trains on the whole training split
    n_ctx: int = pydantic.Field(4, ge=1)  # M, the number of learnt context vectors
    class_specific: bool = False  # one context per class instead of one shared by all
    init: str | None = "a picture of a"  # start from these words' embeddings when they are M tokens
    steps: int = pydantic.Field(200, ge=1)
    lr: float = pydantic.Field(0.002, gt=0)
    batch_size: int = pydantic.Field(32, ge=1)
    logit_scale: float = pydantic.Field(100.0, gt=0)

    @classmethod
    def tiny(cls) -> dict:
        return {"shots": 1, "steps": 3, "batch_size": 8}

    seed: int = 0
    labels: list[str] | None = None  # label keys to evaluate; None: every key with a zero-shot task


def _text_tower(model: MultimodalModel) -> nn.Module:
    if "text" not in model.towers:
        raise ValueError(f"CoOp learns text prompts, but this model has no text tower ({model.modalities})")
    tower = model.towers["text"]
    if not callable(getattr(tower, "embed", None)):
        raise ValueError(
            f"CoOp needs a text tower that takes token embeddings (`embed(ids)` and "
            f"`forward(ids, token_embeds=...)`, as text_transformer); got {type(tower).__name__}"
        )
    return tower


def prompt_ids(text_transform: Transform, classnames: list[str], n_ctx: int, pad_id: int = 0) -> torch.Tensor:
    """(C, L) ids `[<start>, x * n_ctx, classname tokens, <end>, <pad>*]`.

    Built from the tokenised class names rather than by tokenising placeholder words, whose
    token count a BPE vocabulary does not guarantee. The n_ctx positions after the start token are
    placeholders: they repeat the start id only so the padding mask counts them as real; their
    embeddings are replaced by the learnt context. A class name too long to fit loses its last
    tokens, never the end token."""
    names = text_transform.encode(classnames)  # (C, L): <start> name <end> <pad>*
    C, L = names.shape
    if n_ctx + 2 > L:
        raise ValueError(f"n_ctx={n_ctx} does not fit the context length {L} (needs n_ctx + 2 <= {L})")
    out = torch.full((C, L), pad_id, dtype=torch.long)
    for c in range(C):
        real = int((names[c] != pad_id).sum())
        if real < 2:
            raise ValueError(f"class name {classnames[c]!r} tokenises to nothing")
        body = names[c, 1 : real - 1][: L - n_ctx - 2]  # the name's tokens that fit
        row = torch.cat([names[c, :1].repeat(n_ctx + 1), body, names[c, real - 1 : real]])
        out[c, : len(row)] = row
    return out


class PromptLearner(nn.Module):
    """The learnt context and the frozen prompts it completes; `forward()` -> (C, E) class embeddings.

    Holds the model outside its own module tree (in a tuple), so `parameters()` is the context only
    and nothing can hand the model's weights to an optimiser by accident."""

    def __init__(
        self,
        model: MultimodalModel,
        text_transform: Transform,
        classnames: list[str],
        n_ctx: int = 4,
        class_specific: bool = False,
        init: str | None = "a picture of a",
        seed: int = 0,
    ):
        super().__init__()
        if not classnames:
            raise ValueError("classnames is empty")
        tower = _text_tower(model)
        pad_id = int(getattr(getattr(tower, "cfg", None), "pad_id", 0))
        device = next(model.parameters()).device
        self._model = (model,)
        self.n_ctx = n_ctx
        ids = prompt_ids(text_transform, classnames, n_ctx, pad_id)  # (C, L)
        # Columns that are padding in every prompt change no embedding; every step would pay for them.
        ids = ids[:, : int((ids != pad_id).any(0).nonzero().max()) + 1]  # (C, L')
        self.register_buffer("ids", ids.to(device))
        with torch.no_grad():
            ctx = self._init_context(tower, text_transform, init, pad_id, device)
            # which words the context started from; None: random, N(0, 0.02) as CoOp's
            self.initialised_from = init if ctx is not None else None
            if ctx is None:
                gen = torch.Generator().manual_seed(seed)
                ctx = (torch.randn(n_ctx, tower.width, generator=gen) * 0.02).to(device)  # (M, D)
            if class_specific:
                ctx = ctx.unsqueeze(0).repeat(len(classnames), 1, 1)  # (C, M, D)
        self.ctx = nn.Parameter(ctx.float().clone())  # (M, D) shared or (C, M, D) class-specific

    def _init_context(
        self, tower: nn.Module, text_transform: Transform, init: str | None, pad_id: int, device
    ) -> torch.Tensor | None:
        """(M, D) embeddings of the init words when they are exactly M tokens, else None."""
        if not init:
            return None
        row = text_transform.encode([init])[0]  # (L,) <start> words <end> <pad>*
        words = row[1 : int((row != pad_id).sum()) - 1]
        if len(words) != self.n_ctx:
            return None
        return tower.embed(words[None].to(device))[0]  # (M, D)

    def forward(self) -> torch.Tensor:
        model = self._model[0]
        tower = model.towers["text"]
        C, M = self.ids.shape[0], self.n_ctx
        base = tower.embed(self.ids)  # (C, L, D)
        ctx = self.ctx.to(base.dtype)
        ctx = ctx.expand(C, -1, -1) if ctx.dim() == 2 else ctx  # (C, M, D)
        embeds = torch.cat([base[:, :1], ctx, base[:, 1 + M :]], dim=1)  # (C, L, D)
        return model.features("text", self.ids, token_embeds=embeds).embedding  # (C, E)


def coop_loss(
    class_emb: torch.Tensor, x: torch.Tensor, y: torch.Tensor, logit_scale: float = 100.0
) -> torch.Tensor:
    """Cross-entropy of (N, E) embeddings x against (C, E) class embeddings, as CLIP scores them."""
    return F.cross_entropy(logit_scale * x @ class_emb.T, y)


def train_coop(
    model: MultimodalModel,
    text_transform: Transform,
    classnames: list[str],
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    runtime: Runtime,
    *,
    n_ctx: int = 4,
    class_specific: bool = False,
    steps: int = 200,
    lr: float = 0.002,
    batch_size: int = 32,
    logit_scale: float = 100.0,
    seed: int = 0,
    init: str | None = "a picture of a",
) -> torch.Tensor:
    """Fit CoOp's context on (N, E) normalised embeddings `train_x` with labels `train_y` (N,) in
    [0, C); return the (C, E) normalised class embeddings, on train_x's device.

    SGD with momentum 0.9 and a cosine schedule, as CoOp; batches are reshuffled each pass over the
    data. The model is frozen (requires_grad off for the duration, then restored; no gradient
    reaches its parameters) and run in eval mode (no dropout), then returned to the mode it was in.
    `runtime` gives the precision (the device is the model's).
    """
    C = len(classnames)
    if train_x.dim() != 2 or train_y.shape != (train_x.shape[0],):
        raise ValueError(
            f"train_x must be (N, E) and train_y (N,), got {tuple(train_x.shape)} and {tuple(train_y.shape)}"
        )
    if len(train_y) == 0:
        raise ValueError("no training samples")
    if int(train_y.min()) < 0 or int(train_y.max()) >= C:
        raise ValueError(f"train_y must lie in [0, {C}) for {C} class names, got {train_y.unique().tolist()}")
    frozen = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        model.eval()
        for p in frozen:
            p.requires_grad_(False)
        learner = PromptLearner(model, text_transform, classnames, n_ctx, class_specific, init, seed)
        device = learner.ids.device
        x, y = train_x.to(device).float(), train_y.to(device).long()
        opt = torch.optim.SGD(learner.parameters(), lr=lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        gen = torch.Generator().manual_seed(seed)
        order, pos, bs = torch.randperm(len(y), generator=gen), 0, min(batch_size, len(y))
        with torch.enable_grad():  # the suite evaluates under no_grad
            for _ in range(steps):
                if pos + bs > len(order):
                    order, pos = torch.randperm(len(y), generator=gen), 0
                idx = order[pos : pos + bs].to(device)
                pos += bs
                with runtime.autocast():
                    loss = coop_loss(learner().float(), x[idx], y[idx], logit_scale)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        with torch.no_grad(), runtime.autocast():
            return learner().float().to(train_x.device)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)


def coop_metrics(
    model: MultimodalModel,
    text_transform: Transform,
    eset: EmbeddedSet,
    train: EmbeddedSet,
    runtime: Runtime,
    options: CoOpOptions | None = None,
) -> dict[tuple[str, str], dict[str, float]]:
    """{(modality, label): metrics}: for every label key with class names and every non-text
    modality, fit CoOp on k shots per class of `train`'s samples that have the modality, then classify
    `eset`'s samples that have it with the learnt class embeddings. `runtime`: see `train_coop`."""
    opts = options or CoOpOptions()
    keys = opts.labels if opts.labels is not None else list(eset.tasks)
    for key in keys:
        if key not in eset.tasks:
            raise ConfigError(
                f"coop.labels: '{key}' has no zero-shot task (class names) in dataset '{eset.name}'; "
                f"valid: {', '.join(eset.tasks) or '(none)'}"
            )
        if opts.labels is not None and (key not in eset.labels or key not in train.labels):
            raise ValueError(f"coop: label '{key}' is missing from dataset '{eset.name}' or its train split")
    out: dict[tuple[str, str], dict[str, float]] = {}
    for key in keys:
        if key not in eset.labels or key not in train.labels:
            continue
        for modality in eset.embeddings:
            if modality == "text" or not all(bool(s.has(modality).any()) for s in (eset, train)):
                continue
            train_x, train_y = train.labelled(modality, key)
            if opts.shots is not None:
                idx = sample_shots(train_y, opts.shots, opts.seed)
                train_x, train_y = train_x[idx], train_y[idx]
            classes = train_coop(
                model,
                text_transform,
                eset.tasks[key].classnames,
                train_x,
                train_y,
                runtime,
                n_ctx=opts.n_ctx,
                class_specific=opts.class_specific,
                steps=opts.steps,
                lr=opts.lr,
                batch_size=opts.batch_size,
                logit_scale=opts.logit_scale,
                seed=opts.seed,
                init=opts.init,
            )  # (C, E)
            test_x, test_y = eset.labelled(modality, key)
            out[modality, key] = chunked_classification_metrics(test_x, classes, test_y)
    return out


@register("coop")
class CoOp(FittedEvaluator):
    """CoOp few-shot classification (options: `CoOpOptions`). Target: the modality; label: the key;
    metrics `acc1` (headline), `acc5`, `mean_per_class_recall`."""

    Config = CoOpOptions
    headlines = frozenset({"acc1"})

    def scores(self, eset: EmbeddedSet, train: EmbeddedSet, ctx: EvalContext) -> dict:
        if "text" not in ctx.transforms or ctx.model is None:
            raise ValueError(f"CoOp tokenises class names but got no text transform ({list(ctx.transforms)})")
        return coop_metrics(ctx.model, ctx.transforms["text"], eset, train, ctx.runtime, self.config)
