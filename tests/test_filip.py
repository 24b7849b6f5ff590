"""FILIP late interaction against a brute-force evaluation of its formula (value and gradient), the
objective inside a Task, and the `retrieval_late` evaluator against brute-force scores."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from coalign.config import ObjectiveSpec
from coalign.data.sources.base import Source
from coalign.data.transforms.image import ImageTransform
from coalign.data.transforms.text import BPETextTransform
from coalign.evaluate import late_interaction
from coalign.evaluate.retrieval import retrieval_metrics
from coalign.evaluate.run import evaluate
from coalign.models.model import MultimodalModel
from coalign.objectives.contrastive import info_nce
from coalign.objectives.filip import FILIP, filip_loss, late_interaction_scores
from coalign.objectives.task import Task
from coalign.registry import ENCODERS, OBJECTIVES, ConfigError
from coalign.runtime import Runtime
from helpers import assert_same_value_and_gradient

# ----------------------------------------------------------------------------------- brute force


def _real(mask, row, n):
    return [k for k in range(n) if mask is None or bool(mask[row, k])]


def brute_force_scores(x, mx, y, my):
    """s_i2t[i][j] = mean_{k real in x_i} max_{r real in y_j} x_ik.y_jr; s_t2i[j][i] the other way."""
    Bi, Ni, _ = x.shape
    Bt, Nt, _ = y.shape
    s_i2t = [[None] * Bt for _ in range(Bi)]
    s_t2i = [[None] * Bi for _ in range(Bt)]
    for i in range(Bi):
        for j in range(Bt):
            ks, rs = _real(mx, i, Ni), _real(my, j, Nt)
            dot = {(k, r): (x[i, k] * y[j, r]).sum() for k in ks for r in rs}
            s_i2t[i][j] = sum(max((dot[k, r] for r in rs), key=lambda v: v.item()) for k in ks) / len(ks)
            s_t2i[j][i] = sum(max((dot[k, r] for k in ks), key=lambda v: v.item()) for r in rs) / len(rs)
    return s_i2t, s_t2i


def brute_force_loss(x, mx, y, my, scale):
    """1/2B sum_i [-log softmax_j(scale s_i2t[i])_i - log softmax_i(scale s_t2i[j])_j]."""
    s_i2t, s_t2i = brute_force_scores(x, mx, y, my)
    B = x.shape[0]
    total = 0.0
    for rows in (s_i2t, s_t2i):
        for i in range(B):
            logits = [scale * s for s in rows[i]]
            total = total - (logits[i] - torch.log(sum(torch.exp(v) for v in logits)))
    return total / (2 * B)


def _tokens(B=5, Ni=4, Nt=6, E=3, seed=0, image_mask=False):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(B, Ni, E, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(B, Nt, E, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    lengths = torch.tensor([Nt, 3, 1, Nt - 1, 2][:B])  # ragged captions, one of a single token
    my = torch.arange(Nt)[None, :] < lengths[:, None]  # (B, Nt) True = real
    mx = None
    if image_mask:
        mx = torch.arange(Ni)[None, :] < torch.tensor([Ni, 2, 1, Ni, 3][:B])[:, None]
    return x, mx, y, my


# ------------------------------------------------------------------------------ scores and loss


def test_scores_known_values_and_asymmetry():
    e1, e2 = torch.eye(2)
    x = torch.stack([e1, e2])[None]  # one image, tokens e1, e2
    y = torch.stack([e1, e1])[None]  # one caption: e1 then a padding token
    s_i2t, s_t2i = late_interaction_scores(x, None, y, torch.tensor([[True, False]]))
    # image side: e1 finds e1 (1), e2 finds nothing like it (0) -> 0.5; text side: e1 finds e1 -> 1.
    torch.testing.assert_close(s_i2t, torch.tensor([[0.5]]))
    torch.testing.assert_close(s_t2i, torch.tensor([[1.0]]))


@pytest.mark.parametrize("image_mask", [False, True])
@pytest.mark.parametrize("text_chunk", [None, 2])
def test_filip_loss_matches_brute_force_value_and_gradient(image_mask, text_chunk):
    x, mx, y, my = _tokens(image_mask=image_mask)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True)
    assert_same_value_and_gradient(
        lambda: filip_loss(x, mx, y, my, scale, text_chunk),
        lambda: brute_force_loss(x, mx, y, my, scale),
        (x, y, scale),
    )


def test_scores_match_brute_force_for_unequal_batches():
    x, mx, y, my = _tokens(B=5, image_mask=True)
    s_i2t, s_t2i = late_interaction_scores(x[:3], mx[:3], y, my, text_chunk=2)  # 3 images, 5 texts
    b_i2t, b_t2i = brute_force_scores(x[:3], mx[:3], y, my)
    assert s_i2t.shape == (3, 5) and s_t2i.shape == (5, 3)
    torch.testing.assert_close(s_i2t, torch.stack([torch.stack(r) for r in b_i2t]))
    torch.testing.assert_close(s_t2i, torch.stack([torch.stack(r) for r in b_t2i]))


def test_scores_stay_fp32_under_autocast():
    x, _, y, my = _tokens()
    x, y = x.detach().float(), y.detach().float()
    plain = late_interaction_scores(x, None, y, my)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = late_interaction_scores(x.bfloat16(), None, y, my)
    assert all(s.dtype == torch.float32 for s in mixed)
    for a, b in zip(plain, mixed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=0)  # only the bf16 rounding of x's entries


def test_padding_values_never_matter():
    x, _, y, my = _tokens()
    scale = torch.tensor(10.0, dtype=torch.float64)
    base = filip_loss(x, None, y, my, scale)
    (gy,) = torch.autograd.grad(base, y)
    junk = torch.where(my[..., None], y, 50.0 * torch.randn_like(y))  # huge values in padded slots
    junk = junk.detach().requires_grad_()
    other = filip_loss(x, None, junk, my, scale)
    (gj,) = torch.autograd.grad(other, junk)
    torch.testing.assert_close(other, base)
    torch.testing.assert_close(gj, gy)
    assert gj[~my].abs().max() == 0  # no gradient reaches padding


# ------------------------------------------------------------------------------- the objective


def tiny_model(seed=0, vocab_size=30):
    torch.manual_seed(seed)
    towers = {
        "image": ENCODERS.create("vit", image_size=16, patch_size=8, width=16, depth=1, heads=2),
        "text": ENCODERS.create(
            "text_transformer", vocab_size=vocab_size, context_length=6, width=16, depth=1, heads=2
        ),
    }
    heads = {m: torch.nn.Linear(16, 8, bias=False) for m in towers}
    return MultimodalModel(towers, heads, 8)


def tiny_batch(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 30, (B, 6), generator=g)
    for row, n in enumerate([6, 2, 4, 1, 5, 3][:B]):
        ids[row, n:] = 0  # pad_id
    return {"image": torch.randn(B, 3, 16, 16, generator=g), "text": ids}


def manual_loss(model, batch, scale, skip=1):
    feats = model(batch)
    x = F.normalize(model.heads["image"](feats["image"].tokens.tokens[:, skip:]), dim=-1)
    y = F.normalize(model.heads["text"](feats["text"].tokens.tokens), dim=-1)
    return filip_loss(x, None, y, batch["text"] != 0, scale)


def test_objective_drops_cls_and_shares_the_models_heads():
    model = tiny_model()
    task = Task.from_specs(model, [ObjectiveSpec(name="filip")])
    # The heads are the model's, not copies and not registered twice: one extra parameter (the scale).
    assert len(list(task.parameters())) == len(list(model.parameters())) + 1
    assert not any("_heads" in k for k in task.state_dict())
    batch = tiny_batch()
    out = task(batch)
    assert set(out) == {"loss", "filip_loss", "filip/logit_scale"}
    assert math.isclose(out["filip/logit_scale"].item(), 1 / 0.07, rel_tol=1e-5)
    torch.testing.assert_close(out["filip_loss"], manual_loss(model, batch, 1 / 0.07, skip=1))
    with_cls = Task.from_specs(model, [ObjectiveSpec(name="filip", image_cls=True)])(batch)["filip_loss"]
    torch.testing.assert_close(with_cls, manual_loss(model, batch, 1 / 0.07, skip=0))
    assert not torch.isclose(with_cls, out["filip_loss"])
    grads = torch.autograd.grad(out["loss"], [model.heads["image"].weight, task.objectives[0].logit_scale])
    assert all(g.abs().sum() > 0 for g in grads)


def test_objective_uses_only_rows_with_both_modalities():
    model = tiny_model()
    obj = FILIP()
    obj.bind(model)
    batch = tiny_batch()
    present = {
        "image": torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool),
        "text": torch.tensor([1, 1, 1, 1, 0, 1], dtype=torch.bool),
    }
    both = present["image"] & present["text"]
    partial = {"image": batch["image"][present["image"]], "text": batch["text"][present["text"]]}
    out = obj(model(partial), {**partial, "present": present})
    expected = manual_loss(model, {m: v[both] for m, v in batch.items()}, obj.scale())
    torch.testing.assert_close(out["filip_loss"], expected)


def test_global_term_temperature_clamp_and_config_errors():
    model = tiny_model()
    obj = OBJECTIVES.create("filip", weight_global=0.5)
    obj.bind(model)
    with torch.no_grad():
        obj.logit_scale.fill_(10.0)  # e^10 > 100: clamped
    batch = tiny_batch()
    feats = model(batch)
    out = obj(feats, batch)
    assert math.isclose(out["logit_scale"].item(), 100.0, rel_tol=1e-5)
    glob = info_nce(feats["image"].embedding, feats["text"].embedding, torch.tensor(100.0))
    torch.testing.assert_close(out["global"], glob)
    torch.testing.assert_close(out["filip_loss"], manual_loss(model, batch, 100.0) + 0.5 * glob)
    with pytest.raises(ConfigError, match="weight_global"):
        OBJECTIVES.create("filip", where="objectives.0", weight_globl=1.0)
    with pytest.raises(ConfigError, match="no tower for \\['audio'\\]"):
        OBJECTIVES.create("filip", modalities=["audio", "text"]).bind(model)
    with pytest.raises(RuntimeError, match="bind"):
        FILIP()(feats, batch)


def test_filip_model_trains():
    model = tiny_model()
    task = Task.from_specs(model, [ObjectiveSpec(name="filip")])
    opt = torch.optim.Adam(task.parameters(), lr=3e-3)
    batch = tiny_batch()
    losses = []
    for _ in range(6):
        loss = task(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]


# ------------------------------------------------------------------------------- the evaluator


class ListSource(Source):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def _source():
    rng = np.random.default_rng(0)
    captions = [
        ["a red circle", "red round thing"],
        ["a blue square"],
        [],  # skipped: no caption, so the captions after it belong to the next kept sample
        ["green triangle", "a small green shape", "triangle"],
        ["yellow star"],
        ["purple cross", "a cross"],
        ["big orange blob"],
    ]
    return ListSource(
        [
            {"image": rng.integers(0, 255, (16, 16, 3)), "text": c, "id": str(i)}
            for i, c in enumerate(captions)
        ]
    )


def _transforms(source):
    text = BPETextTransform(context_length=6, vocab_size=300)
    text.fit(source, None)
    return {"image": ImageTransform(size=16).eval(), "text": text.eval()}


def brute_force_recalls(model, transforms, source):
    """Encode one item at a time, score with the brute-force loops, rank with the full-matrix metric."""
    images, captions, owner = [], [], []
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for raw in source.samples:
            if not raw["text"]:
                continue
            feats = model.features("image", transforms["image"](raw["image"], rng)[None])
            images.append(F.normalize(model.heads["image"](feats.tokens.tokens[:, 1:]), dim=-1))
            for caption in raw["text"]:
                ids = transforms["text"].encode([caption])
                tokens = model.features("text", ids).tokens
                captions.append((F.normalize(model.heads["text"](tokens.tokens), dim=-1), tokens.mask))
                owner.append(len(images) - 1)
        x = torch.cat(images)  # (I, Ni, E)
        s_i2t = torch.zeros(len(images), len(captions))
        s_t2i = torch.zeros(len(captions), len(images))
        for t, (y, my) in enumerate(captions):
            a, b = brute_force_scores(x, None, y, my)
            s_i2t[:, t] = torch.tensor([float(r[0]) for r in a])
            s_t2i[t] = torch.tensor([float(v) for v in b[0]])
    owner = torch.tensor(owner)
    t2i, i2t = retrieval_metrics(s_t2i, owner), retrieval_metrics(s_i2t.T, owner)
    out = {k: v for k, v in t2i.items() if k.startswith("image_")}
    out.update({k: v for k, v in i2t.items() if k.startswith("text_")})
    return out


@pytest.mark.parametrize("block_elements", [2**24, 40])  # one block, and blocks of a few pairs
def test_retrieval_late_matches_brute_force(monkeypatch, block_elements):
    monkeypatch.setattr(late_interaction, "BLOCK_ELEMENTS", block_elements)
    source = _source()
    transforms = _transforms(source)
    model = tiny_model(vocab_size=transforms["text"].describe()["vocab_size"]).eval()
    evaluators = ["retrieval", "retrieval_late"]
    results = evaluate(model, transforms, {"s": source}, evaluators, Runtime.cpu(), batch_size=2).flat()["s"]
    assert results["skipped/empty_caption"] == 1
    expected = brute_force_recalls(model, transforms, source)
    got = {k.removeprefix("retrieval_late/image/"): v for k, v in results.items() if "retrieval_late" in k}
    assert got == pytest.approx(expected)
    assert 0 < got["image_retrieval_recall@1"] < 1  # not a degenerate case where any scorer agrees


@pytest.mark.slow
def test_filip_recipe_trains_and_evaluates(tmp_path, tiny_recipe):
    from coalign.train.loop import train

    recipe = tiny_recipe(
        "objectives=[{name: filip}]", "eval.evaluators=[retrieval, retrieval_late]", "train.steps=3"
    )
    result = train(recipe, tmp_path / "run", progress=False)
    metrics = result.results.flat()["heldout_samples"]
    for direction in ("image", "text"):
        assert 0 <= metrics[f"retrieval_late/image/{direction}_retrieval_recall@1"] <= 1
