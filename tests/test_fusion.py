"""Fusion parts and the objectives that read fused tokens (issue #16): masks on both sides, ITM's
hard-negative draw, MLM's masking and loss, gradients, recipe checks."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from coalign.config import ObjectiveSpec, load_recipe
from coalign.models.encoders.base import Tokens
from coalign.objectives.itm import hard_negatives, same_rows
from coalign.objectives.mlm import IGNORE, mask_tokens, mlm_loss
from coalign.objectives.task import Task
from coalign.registry import FUSION, ConfigError
from parts import tiny_batch, tiny_fusion, tiny_model, transforms_for, world


def fusion_part(name: str, query_width: int = 24, context_width: int = 40):
    cfg = FUSION.validate(name, FUSION.tiny(name))
    return FUSION.get(name)(cfg, {"text": query_width, "image": context_width}).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny image + text transforms fitted on the world, and a batch where every other sample lacks
    its image (so objectives pair present rows)."""
    torch.manual_seed(0)
    source = world(["image", "text"])
    transforms = transforms_for(["image", "text"], source, tmp_path_factory.mktemp("fusion"))
    batch = tiny_batch(source, transforms, size=8, missing="image")
    return transforms, batch


def model_with(transforms, name: str):
    torch.manual_seed(0)
    return tiny_model(transforms, fusion=tiny_fusion("image", "text", name))


# ------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("name", ["cross", "single"])
def test_the_amount_of_padding_on_either_side_changes_nothing(name):
    fusion = fusion_part(name)
    torch.manual_seed(1)
    q, c = torch.randn(2, 4, 24), torch.randn(2, 3, 40)
    q_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        ref = fusion(Tokens(q, q_mask), Tokens(c, None))  # the context has no padding at all
        # two more padded positions on each side, holding large values
        q2 = torch.cat([q, torch.randn(2, 2, 24) * 50], 1)
        c2 = torch.cat([c, torch.randn(2, 2, 40) * 50], 1)
        q2_mask = torch.cat([q_mask, torch.zeros(2, 2, dtype=torch.bool)], 1)
        c2_mask = torch.tensor([[1, 1, 1, 0, 0]] * 2, dtype=torch.bool)
        out = fusion(Tokens(q2, q2_mask), Tokens(c2, c2_mask))
    torch.testing.assert_close(out.tokens[:, :4][q_mask], ref.tokens[:, :4][q_mask], rtol=1e-4, atol=1e-5)
    if name == "single":  # the context's rows follow the query's
        torch.testing.assert_close(out.tokens[:, 6:9], ref.tokens[:, 4:7], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["cross", "single"])
def test_model_fuse_honours_the_text_towers_padding(setup, name):
    """Through the real towers: cutting a caption's trailing <pad> columns changes no fused token."""
    transforms, batch = setup
    model = model_with(transforms, name).eval()
    ids, images = batch["text"][:2].clone(), torch.randn(2, 3, 32, 32)
    ids[0, 5], ids[0, 6:] = 2, 0  # <bos> 4 words <eos> <pad>*
    ids[1, 7], ids[1, 8:] = 2, 0
    keep = 8
    with torch.no_grad():
        full = model.fuse({"text": model.features("text", ids), "image": model.features("image", images)})
        short = model.fuse(
            {"text": model.features("text", ids[:, :keep]), "image": model.features("image", images)}
        )
    real = ids[:, :keep] != 0
    torch.testing.assert_close(
        short.tokens[:, :keep][real], full.tokens[:, :keep][real], rtol=1e-4, atol=1e-5
    )


# --------------------------------------------------------------------------------------------- ITM


def test_same_rows_compares_whole_captions():
    ids = torch.tensor([[1, 5, 2], [1, 6, 2], [1, 5, 2], [1, 5, 0]])
    expected = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(same_rows(ids), expected)


def test_hard_negatives_are_never_the_positive_nor_the_same_caption():
    gen = torch.Generator().manual_seed(0)
    M = 12
    ids = torch.randint(3, 6, (M, 2), generator=gen)  # few distinct captions: many duplicates
    same = same_rows(ids)
    for _ in range(100):
        # similarities that favour the positive and its duplicates most: the draw must still skip them
        sim = torch.randn(M, M, generator=gen) + 5 * same
        idx, valid = hard_negatives(sim, same, 0.07, gen)
        rows = valid.nonzero().squeeze(1)
        assert not same[rows, idx[rows]].any()
        assert torch.equal(valid, ~same.all(1))


def test_a_row_without_any_negative_is_marked_invalid():
    same = torch.ones(3, 3, dtype=torch.bool)
    same[2, 0] = same[0, 2] = False
    idx, valid = hard_negatives(torch.zeros(3, 3), same, 0.1)
    assert valid.tolist() == [True, False, True]
    assert idx[0] == 2 and idx[2] == 0


def test_hard_negatives_follow_the_softmax_of_the_similarities():
    """Chi-square goodness of fit of 20,000 draws against softmax(sim / t) renormalised over the
    admissible columns (fixed seed; p > 0.001 holds for a correct sampler but not for a uniform one
    or one that forgets the temperature)."""
    gen = torch.Generator().manual_seed(0)
    sim = torch.tensor([[0.9, 0.5, 0.4, 0.2, 0.0, -0.1]])
    exclude = torch.tensor([[True, False, True, False, False, False]])  # the positive and a duplicate
    t, n = 0.2, 20_000
    counts = torch.bincount(hard_negatives(sim.expand(n, -1), exclude.expand(n, -1), t, gen)[0], minlength=6)
    assert counts[exclude[0]].sum() == 0
    allowed = ~exclude[0]
    expected = torch.softmax((sim[0].double() / t).masked_fill(~allowed, float("-inf")), 0)[allowed] * n
    observed = counts[allowed].double().numpy()
    assert stats.chisquare(observed, expected.numpy()).pvalue > 1e-3
    uniform = torch.full_like(expected, n / int(allowed.sum()))
    assert stats.chisquare(observed, uniform.numpy()).pvalue < 1e-6


def test_itm_with_every_caption_equal_trains_on_positives_only(setup):
    transforms, batch = setup
    model = model_with(transforms, "cross")
    task = Task.from_specs(model, [ObjectiveSpec(name="itm")], transforms)
    same = dict(batch, text=batch["text"][:1].expand_as(batch["text"]).clone())
    out = task(same)
    assert torch.isfinite(out["itm_loss"])


# --------------------------------------------------------------------------------------------- MLM


def test_masking_follows_bert_15_80_10_10_and_spares_special_tokens():
    gen = torch.Generator().manual_seed(0)
    V = 500
    words = torch.ones(V, dtype=torch.bool)
    words[:3] = False  # <pad>, <bos>, <eos>
    ids = torch.randint(3, V, (400, 64), generator=gen)
    ids[:, 0], ids[:, 40], ids[:, 41:] = 1, 2, 0  # <bos> words <eos> <pad>*
    m = mask_tokens(ids, words, 0.15, 0.8, 0.1, gen)
    chosen = m.labels != IGNORE
    eligible = words[ids]
    assert not chosen[~eligible].any() and not m.use_mask[~eligible].any(), "special tokens are never masked"
    assert torch.equal(m.labels[chosen], ids[chosen]), "the labels are the original ids"
    assert torch.equal(m.ids[~chosen], ids[~chosen]), "unchosen tokens stay as they are"
    assert words[m.ids[chosen]].all(), "a random replacement is never a special token"
    n = chosen.sum().item()
    assert abs(n / eligible.sum().item() - 0.15) < 0.01
    masked = m.use_mask.sum().item()
    replaced = (chosen & ~m.use_mask & (m.ids != ids)).sum().item()  # a random draw equal to the id: 1/497
    assert abs(masked / n - 0.8) < 0.02 and abs(replaced / n - 0.1) < 0.015
    assert abs((n - masked - replaced) / n - 0.1) < 0.015


def test_mlm_loss_equals_a_brute_force_cross_entropy(setup):
    transforms, batch = setup
    model = model_with(transforms, "cross").eval()
    task = Task.from_specs(model, [ObjectiveSpec(name="mlm", mask_prob=0.3)], transforms)
    mlm = task.objectives[0].eval()
    features = model(batch)
    mlm.generator = torch.Generator().manual_seed(3)
    out = mlm(features, batch)
    mlm.generator = torch.Generator().manual_seed(3)  # the same masking again
    with torch.no_grad():
        tokens, masked, _ = mlm.predict(features, batch)
        logits = mlm.head(tokens).float()  # (M, L, V), every position
    specials = transforms["text"].special_ids()
    total, count = 0.0, 0
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            label = int(masked.labels[i, j])
            if label == IGNORE:
                continue
            assert label not in specials
            row = logits[i, j].clone()
            row[specials] = float("-inf")  # never predicted
            total += float(row.max() + torch.log(torch.exp(row - row.max()).sum()) - row[label])
            count += 1
    assert count > 0
    torch.testing.assert_close(out["mlm_loss"].item(), total / count, rtol=1e-5, atol=1e-5)


def test_mlm_loss_without_chosen_positions_is_zero_and_attached():
    head = torch.nn.Linear(4, 7)
    loss, accuracy = mlm_loss(
        head, torch.randn(2, 3, 4), torch.full((2, 3), IGNORE), torch.zeros(7, dtype=torch.bool)
    )
    assert loss.item() == 0 and loss.requires_grad and accuracy.item() == 0


# ---------------------------------------------------------------------------------------- together


@pytest.mark.parametrize("name", ["cross", "single"])
def test_gradients_reach_both_towers_and_the_fusion_part(setup, name):
    transforms, batch = setup
    model = model_with(transforms, name).train()
    specs = [ObjectiveSpec(name=n) for n in ("clip", "itm", "mlm")]
    task = Task.from_specs(model, specs, transforms)
    out = task(batch)
    assert {"clip_loss", "itm_loss", "mlm_loss", "itm/accuracy", "mlm/accuracy"} <= set(out)
    out["loss"].backward()
    parts = (
        model.towers["image"],
        model.towers["text"],
        model.fusion,
        model.fusion.match_head,
        task.objectives[2],
    )
    for part in parts:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), part
    keys = set(task.state_dict())
    assert any(k.startswith("model.fusion.") for k in keys), "the fusion part is in the checkpoint"


def test_a_recipe_fails_at_load_without_the_fusion_its_objectives_need():
    with pytest.raises(ConfigError, match=r"objectives\.1: 'itm' reads fused tokens; add a fusion part"):
        load_recipe("albef", ["model.fusion=null"])
    with pytest.raises(ConfigError, match=r"model\.fusion\.context: the model has no 'audio' tower"):
        load_recipe("albef", ["model.fusion.context=audio"])
    with pytest.raises(ConfigError, match=r"model\.fusion: unknown fusion 'crosss' \(did you mean 'cross'"):
        load_recipe("albef", ["model.fusion.fusion=crosss"])
    with pytest.raises(ConfigError, match=r"model\.fusion.*heads"):
        load_recipe("albef", ["model.fusion.heads=3"])
    recipe = load_recipe("albef", smoke=True)
    assert recipe.model.fusion.options()["width"] == 32, "--smoke shrinks the fusion part too"
