"""Every entry of every registry, built from its Config's tiny settings, honours its part's contract
(timm's way: the tests iterate the registries, so a part registered tomorrow is tested by these
without a new test file). Each `check_*` function is the whole check of one kind of part; the last
test shows that a broken toy objective fails `check_objective`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coalign.build import load_run
from coalign.data.sample import base_modality
from coalign.data.sources.base import Source, ZeroShotTask
from coalign.evaluate.base import EvalContext, Metric
from coalign.evaluate.embed import embed_eval_set, text_encoder
from coalign.models.encoders.base import Encoder, Tokens
from coalign.objectives.base import Objective
from coalign.registry import DECODERS, ENCODERS, EVALUATORS, FUSION, HEADS, OBJECTIVES, SOURCES, TRANSFORMS
from coalign.runtime import Runtime
from parts import (
    bad_grads,
    needs_decoder,
    needs_fusion,
    tiny_batch,
    tiny_decoder,
    tiny_encoder_options,
    tiny_fusion,
    tiny_model,
    tiny_transform,
    transform_for,
    transforms_for,
    world,
)

# ------------------------------------------------------------------------------------------ encoders


def encoder_batch(name: str, size: int = 4) -> tuple[Encoder, torch.Tensor]:
    """The encoder at its tiny settings, and a batch of what its modality's tiny transform makes of
    raw world values (eval mode; fitted on the world first, as a tokenizer must be)."""
    modality = ENCODERS.get(name).modality
    assert modality, f"encoder '{name}' declares no modality (the kind of raw value its input comes from)"
    source = world([modality])
    transform = tiny_transform(transform_for(modality), fit_on=source).eval()
    rng = np.random.default_rng(0)
    x = torch.stack([transform(source[i][modality], rng) for i in range(size)])
    return ENCODERS.create(name, **tiny_encoder_options(name, transform.describe())), x


def check_encoder(encoder: Encoder, x: torch.Tensor) -> None:
    B = x.shape[0]
    torch.manual_seed(0)
    out = encoder.train()(x)
    tokens, mask = out
    assert tokens.ndim == 3 and tokens.shape[0] == B and tokens.shape[2] == encoder.width, tokens.shape
    assert 0 <= encoder.num_prefix_tokens < tokens.shape[1]
    if mask is not None:
        assert mask.shape == tokens.shape[:2] and mask.dtype == torch.bool
        assert mask.any(dim=1).all(), "every sample has at least one real token"
    pooled = encoder.pool(out)
    assert pooled.shape == (B, encoder.width) and torch.isfinite(pooled).all()
    # Not .sum(): the sum of a LayerNorm output over its channels is constant, its gradient zero.
    pooled.square().sum().backward()
    assert not (bad := bad_grads(encoder, every=True)), bad
    encoder.eval()
    with torch.no_grad():
        full = encoder.pool(encoder(x))
        # a sample's embedding does not depend on the rest of its batch
        torch.testing.assert_close(full[1:2], encoder.pool(encoder(x[1:2])), rtol=1e-4, atol=1e-5)
        if mask is not None:  # padding: cutting a sample's trailing padding positions changes nothing
            b = int(mask.sum(1).argmin())  # the sample with the most padding
            keep = int(mask[b].nonzero().max()) + 1
            assert keep < x.shape[1], "the example batch should hold padding"
            short = encoder(x[b : b + 1, :keep])
            torch.testing.assert_close(encoder.pool(short)[0], full[b], rtol=1e-4, atol=1e-5)
            real = encoder(x).tokens[b, :keep][mask[b, :keep]]
            torch.testing.assert_close(short.tokens[0][short.mask[0]], real, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ENCODERS.names())
def test_encoder(name):
    check_encoder(*encoder_batch(name))


# -------------------------------------------------------------------------------------------- heads


@pytest.mark.parametrize("name", HEADS.names())
def test_head(name):
    out = 32 if getattr(HEADS.get(name), "square", False) else 16  # square: width == embed_dim only
    head = HEADS.get(name)(32, out)
    x = torch.randn(5, 32, requires_grad=True)
    y = head(x)
    assert y.shape == (5, out) and torch.isfinite(y).all()
    assert head(torch.randn(2, 7, 32)).shape == (2, 7, out), "heads map the last dimension (tokens too)"
    y.square().sum().backward()
    assert not (bad := bad_grads(head, every=True)), bad


# --------------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("name", TRANSFORMS.names())
def test_transform(name):
    modality = TRANSFORMS.get(name).modality
    assert modality, f"transform '{name}' declares no modality (the kind of raw value it reads)"
    source = world([modality])
    transform = tiny_transform(name, fit_on=source)
    raw = source[0][modality]
    seeded = [transform(raw, np.random.default_rng(seed)) for seed in (7, 7)]
    same_seed = "training output is a function of the rng"
    torch.testing.assert_close(seeded[0], seeded[1], rtol=0, atol=0, msg=same_seed)
    assert torch.is_tensor(seeded[0])
    transform.eval()
    a = transform(raw, np.random.default_rng(1))
    b = transform(raw, np.random.default_rng(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0, msg="eval mode is deterministic, whatever the rng")
    assert a.shape == seeded[0].shape or a.ndim < seeded[0].ndim  # a training group (k, L) vs (L,)
    if a.is_floating_point():
        assert torch.isfinite(a[~a.isnan()]).all()
    assert isinstance(transform.describe(), dict)


# ------------------------------------------------------------------------------------------ sources


def check_source(source: Source) -> None:
    assert len(source) > 0
    for i in range(min(len(source), 3)):
        sample = source[i]
        assert isinstance(sample, dict) and "id" in sample, sample
        assert isinstance(sample.get("label", {}), dict)
    for key, task in source.zero_shot_tasks().items():
        assert isinstance(task, ZeroShotTask) and task.key == key
        assert task.classnames and task.templates and all("{}" in t for t in task.templates)
        labels = [source[i]["label"][key] for i in range(min(len(source), 3))]
        assert all(0 <= int(y) < len(task.classnames) for y in labels)


@pytest.mark.parametrize("name", SOURCES.names())
def test_source(name, tmp_path):
    options = {**SOURCES.tiny(name), **SOURCES.get(name).example(tmp_path)}
    check_source(SOURCES.create(name, **options))


# ------------------------------------------------------------------------------------------- fusion


def padded_tokens(B: int, N: int, D: int, real: list[int] | None) -> Tokens:
    """Random (B, N, D) tokens; with `real`, row b has real[b] real tokens and the rest padding."""
    tokens = torch.randn(B, N, D)
    if real is None:
        return Tokens(tokens, None)
    return Tokens(tokens, torch.arange(N)[None, :] < torch.tensor(real)[:, None])


def check_fusion(fusion: torch.nn.Module) -> None:
    """Built for query width 24 and context width 40. Fused tokens (B, N, D) start with the query's
    rows; padded tokens of either side, whatever their values, change no real fused token; every
    parameter gets a finite gradient."""
    query, context = padded_tokens(2, 6, 24, [3, 6]), padded_tokens(2, 5, 40, [5, 2])
    out = fusion.train()(query, context)
    assert out.tokens.ndim == 3 and out.tokens.shape[0] == 2 and out.tokens.shape[2] == fusion.width
    assert out.tokens.shape[1] >= query.tokens.shape[1], "the query's rows come first"
    assert out.mask is not None and out.mask.shape == out.tokens.shape[:2]
    assert torch.equal(out.mask[:, :6], query.mask), "the query's rows keep the query's mask"
    out.tokens[out.mask].square().sum().backward()
    # the ITM head sits on the fused [CLS] but is not part of fusing: `itm` trains it (test_fusion.py)
    bad = [b for b in bad_grads(fusion, every=True) if ".match_head." not in b]
    assert not bad, bad
    fusion.eval()
    with torch.no_grad():
        ref = fusion(query, context)
        noisy_q = torch.where(query.mask[..., None], query.tokens, torch.randn_like(query.tokens) * 9)
        noisy_c = torch.where(context.mask[..., None], context.tokens, torch.randn_like(context.tokens) * 9)
        out = fusion(Tokens(noisy_q, query.mask), Tokens(noisy_c, context.mask))
        torch.testing.assert_close(out.tokens[ref.mask], ref.tokens[ref.mask], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", FUSION.names())
def test_fusion(name):
    torch.manual_seed(0)
    cfg = FUSION.validate(name, FUSION.tiny(name))
    check_fusion(FUSION.get(name)(cfg, {cfg.query: 24, cfg.context: 40}))


# ----------------------------------------------------------------------------------------- decoders


def check_decoder(decoder: torch.nn.Module) -> None:
    """Built for text width 24 and context width 40. Logits (B, L, vocab); position t depends on no
    later text token (causal) and on no padded token of either side, whatever its value; every
    parameter gets a finite gradient."""
    text, context = padded_tokens(2, 6, 24, [3, 6]), padded_tokens(2, 5, 40, [5, 2])
    logits = decoder.train()(text, context)
    assert logits.shape == (2, 6, decoder.vocab_size) and logits.dtype == torch.float32, logits.shape
    logits[text.mask].square().sum().backward()
    assert not (bad := bad_grads(decoder, every=True)), bad
    decoder.eval()
    with torch.no_grad():
        ref = decoder(text, context)
        noisy_t = torch.where(text.mask[..., None], text.tokens, torch.randn_like(text.tokens) * 9)
        noisy_c = torch.where(context.mask[..., None], context.tokens, torch.randn_like(context.tokens) * 9)
        out = decoder(Tokens(noisy_t, text.mask), Tokens(noisy_c, context.mask))
        torch.testing.assert_close(out[text.mask], ref[text.mask], rtol=1e-4, atol=1e-5)
        later = text.tokens.clone()
        later[:, 3:] = torch.randn_like(later[:, 3:])  # every token from position 3 on
        out = decoder(Tokens(later, text.mask), context)
        torch.testing.assert_close(out[:, :3], ref[:, :3], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(out[1, 3:], ref[1, 3:]), "a position reads the tokens before it"


@pytest.mark.parametrize("name", DECODERS.names())
def test_decoder(name):
    torch.manual_seed(0)
    cfg = DECODERS.validate(name, {**DECODERS.tiny(name), "vocab_size": 11})
    check_decoder(DECODERS.get(name)(cfg, {cfg.text: 24, cfg.context: 40}))


# --------------------------------------------------------------------------------------- objectives


def needs_teacher(name: str) -> bool:
    return "teacher" in getattr(OBJECTIVES.config_class(name), "model_fields", {})


def objective_setup(
    name: str, tmp_path, request=None, teacher=None, lacking=None
) -> tuple[Objective, torch.nn.Module, dict]:
    """The objective at its tiny settings, bound to a tiny model with a tower for each modality it
    names (image and text when it names none), and a batch where every other sample (or the samples
    `lacking`) lacks the last of them. A teacher run comes from `teacher` (a path) or the session
    fixture."""
    options = OBJECTIVES.tiny(name)
    if needs_teacher(name):
        run = load_run(teacher or request.getfixturevalue("teacher"))
        options["teacher"] = str(run.run_dir)
    cfg = OBJECTIVES.validate(name, options)
    keys = [k for named in getattr(cfg, "batch_keys", dict)().values() for k in named]
    keys = list(dict.fromkeys(keys or ["image", "text"]))
    bases = list(dict.fromkeys(base_modality(k) for k in keys))
    source = world(bases)
    if "teacher" in options:  # the student reads the teacher's inputs (its tokenizer, image size)
        transforms = {k: run.transforms[base_modality(k)] for k in keys}
        for t in transforms.values():
            t.train = True
    else:
        transforms = transforms_for(list(dict.fromkeys([*bases, *keys])), source, tmp_path)
    # an objective that reads fused tokens gets a fusion part over the modalities it pairs
    # (of the kind it names, when it needs one kind: M3AE's single stream)
    fusion = tiny_fusion(*cfg.modalities, getattr(cfg, "fusion_kind", None)) if needs_fusion(cfg) else None
    # an objective that trains a caption decoder gets one over the towers it names
    decoder = tiny_decoder(base_modality(cfg.image), base_modality(cfg.text)) if needs_decoder(cfg) else None
    model = tiny_model(transforms, fusion=fusion, decoder=decoder)
    objective = OBJECTIVES.create(name, **options)
    objective.bind(model, transforms)
    batch = tiny_batch(source, transforms, size=6, missing=bases[-1], lacking=lacking)
    assert not batch["present"][bases[-1]].all(), "the batch should lack a modality somewhere"
    return objective, model, batch


def check_objective(objective: Objective, model: torch.nn.Module, batch: dict) -> None:
    """Forward and backward: at least one `*_loss`, every value a finite scalar, a value that carries
    a gradient is a loss (the Task sums only `*_loss` keys), and every gradient finite."""
    out = objective(model(batch), batch)
    assert isinstance(out, dict) and out, f"objective returned {out!r}"
    losses = [k for k in out if k.endswith("_loss")]
    assert losses, f"no '*_loss' key among {sorted(out)}: the Task would train nothing"
    for key, value in out.items():
        assert torch.is_tensor(value) and value.ndim == 0, f"'{key}' is not a scalar tensor"
        assert torch.isfinite(value), f"'{key}' is {value.item()}"
        if not key.endswith("_loss"):
            assert not value.requires_grad, f"'{key}' carries a gradient but is not named '*_loss'"
    sum(out[k] for k in losses).backward()
    assert not (bad := bad_grads(model, objective)), bad
    reached = [p for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert reached, "no gradient reaches the model"


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_objective(name, tmp_path, request):
    torch.manual_seed(0)
    check_objective(*objective_setup(name, tmp_path, request))


class Broken(Objective):
    """A toy objective with two mistakes the checks must catch, one at a time."""

    mistake = "unnamed"

    def forward(self, features, batch):
        e = features["image"].embedding
        loss = (e @ features["text"].embedding.T).mean()
        if self.mistake == "unnamed":
            return {"contrast": loss}  # a loss the Task would not sum
        if self.mistake == "metric":
            return {"broken_loss": loss, "similarity": loss}  # a metric left attached
        return {"broken_loss": loss * float("nan")}


@pytest.mark.parametrize(
    "mistake, message",
    [("unnamed", "no '\\*_loss' key"), ("metric", "carries a gradient"), ("nan", "is nan")],
)
def test_a_broken_objective_fails_the_objective_check(mistake, message, tmp_path, request):
    broken = type("BrokenToy", (Broken,), {"mistake": mistake})
    with OBJECTIVES.temporary("broken_toy", broken):
        assert "broken_toy" in OBJECTIVES.names()
        with pytest.raises(AssertionError, match=message):
            check_objective(*objective_setup("broken_toy", tmp_path, request))
    assert "broken_toy" not in OBJECTIVES.names()


def test_temporary_entries_leave_even_when_the_block_raises():
    with pytest.raises(RuntimeError), OBJECTIVES.temporary("broken_toy", Broken):
        raise RuntimeError
    assert "broken_toy" not in OBJECTIVES
    with pytest.raises(ValueError, match="registered twice"), OBJECTIVES.temporary("clip", Broken):
        pass
    assert OBJECTIVES.get("clip") is not Broken


# --------------------------------------------------------------------------------------- evaluators


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """A tiny untrained image-text-points model on a world split and a labelled training split, both
    embedded as evaluation embeds them: every evaluator runs on it."""
    torch.manual_seed(0)
    modalities = ["image", "text", "points"]
    train_source = world(modalities, size=18)
    transforms = transforms_for(modalities, train_source, tmp_path_factory.mktemp("eval"))
    for t in transforms.values():
        t.eval()
    # with an image-text fusion part, for the evaluators that score pairs with it (re-ranking),
    # and a caption decoder, for the evaluators that generate captions with it
    model = tiny_model(
        transforms, fusion=tiny_fusion("image", "text"), decoder=tiny_decoder("image", "text")
    ).eval()
    runtime = Runtime.cpu()
    test_source = world(modalities, split="test", size=12)
    eset = embed_eval_set("tiny", model, transforms, test_source, runtime, batch_size=8)
    train = embed_eval_set("tiny_train", model, transforms, train_source, runtime, batch_size=8)
    encode = text_encoder(model, transforms["text"], runtime, batch_size=8)
    ctx = EvalContext(model, transforms, test_source, encode, runtime, 8, None, train)
    return eset, ctx


def check_evaluator(records: list[Metric], name: str, task: str) -> None:
    assert records, f"evaluator '{name}' returned no records on a set that has what it needs"
    for m in records:
        assert isinstance(m, Metric) and m.evaluator == name and m.dataset == "tiny", m
        assert m.task == task and isinstance(m.headline, bool), m
        assert m.target and m.name and math.isfinite(m.value), m
    assert any(m.headline for m in records), f"evaluator '{name}' marks no headline metric"


@pytest.mark.parametrize("name", EVALUATORS.names())
def test_evaluator(name, embedded):
    eset, ctx = embedded
    evaluator = EVALUATORS.create(name, **EVALUATORS.tiny(name))
    records = evaluator(eset, ctx)
    check_evaluator(records, name, evaluator.task or name)


def test_every_registry_is_covered():
    """Each registry has a parametrized test above; a new registry needs one too."""
    from coalign.registry import ALL

    assert set(ALL) == {
        "sources",
        "transforms",
        "encoders",
        "heads",
        "fusion",
        "decoders",
        "objectives",
        "evaluators",
    }
