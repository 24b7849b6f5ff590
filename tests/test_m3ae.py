"""M3AE (issue #17.3): image patches and caption words masked together, one joint encoder (towers +
single-stream fusion), reconstruction of both; the word draw, the text loss and the hiding against
brute force, and the parts it needs refused clearly."""

from __future__ import annotations

import math

import pytest
import torch

from coalign.config import ObjectiveSpec
from coalign.objectives.m3ae import M3AE, hide_words, text_loss
from coalign.objectives.task import Task
from coalign.registry import ConfigError
from parts import bad_grads, tiny_batch, tiny_fusion, tiny_model, transforms_for, world


def test_hide_words_hides_round_ratio_of_the_eligible_in_each_row():
    torch.manual_seed(0)
    eligible = torch.rand(50, 12) < 0.6
    eligible[0] = False  # a row with no word hides nothing
    for ratio in (0.25, 0.5, 0.75):
        hidden = hide_words(eligible, ratio)
        assert not (hidden & ~eligible).any(), "only eligible positions are hidden"
        want = (eligible.sum(1).double() * ratio).round()
        assert torch.equal(hidden.sum(1).double(), want)
    # uniform over the eligible positions: every one is hidden about half the time at ratio 0.5
    row = torch.ones(2000, 6, dtype=torch.bool)
    freq = hide_words(row, 0.5).float().mean(0)
    assert (freq - 0.5).abs().max() < 0.05


def test_text_loss_matches_brute_force_cross_entropy_over_hidden_words():
    torch.manual_seed(1)
    ids = torch.randint(0, 7, (2, 4))
    hidden = torch.tensor([[False, True, True, False], [True, False, False, False]])
    logits = torch.randn(3, 7)
    loss, acc = text_loss(logits, ids, hidden)
    targets = [int(ids[0, 1]), int(ids[0, 2]), int(ids[1, 0])]
    total = 0.0
    for row, t in zip(logits.double().tolist(), targets, strict=True):
        total += math.log(sum(math.exp(v) for v in row)) - row[t]
    assert loss.item() == pytest.approx(total / 3, rel=1e-6)
    hits = sum(
        int(max(range(7), key=lambda j: r[j]) == t) for r, t in zip(logits.tolist(), targets, strict=True)
    )
    assert acc.item() == pytest.approx(hits / 3)
    none, _ = text_loss(logits[:0], ids, torch.zeros_like(hidden))
    assert none.item() == 0


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    source = world(["image", "text"], captions=1)
    transforms = transforms_for(["image", "text"], source, tmp_path_factory.mktemp("m3ae"))
    return transforms, tiny_batch(source, transforms, size=6, missing="image")


def m3ae_task(transforms, fusion="single", **options):
    torch.manual_seed(0)
    model = tiny_model(transforms, fusion=tiny_fusion("image", "text", fusion))
    specs = [ObjectiveSpec(name="clip"), ObjectiveSpec(name="m3ae", **{**M3AE.Config.tiny(), **options})]
    return Task.from_specs(model, specs, transforms)


def test_hidden_words_reach_no_other_token(parts):
    """Hiding a word is removing it: the other tokens' outputs do not depend on its id."""
    transforms, batch = parts
    task = m3ae_task(transforms).eval()
    text = task.model.towers["text"]
    ids = batch["text"]
    real = text.real_tokens(ids)
    hidden = hide_words(real & (ids > 2), 0.5)
    other = torch.where(hidden, torch.randint_like(ids, 3, text.cfg.vocab_size), ids)
    a, b = text(ids, hidden=hidden), text(other, hidden=hidden)
    assert torch.equal(a.mask, real & ~hidden)
    torch.testing.assert_close(a.tokens[a.mask], b.tokens[b.mask])


def test_m3ae_reconstructs_both_and_trains_every_part(parts):
    transforms, batch = parts
    task = m3ae_task(transforms, text_weight=0.5).train()
    out = task(batch)
    assert {"clip_loss", "m3ae_loss", "m3ae/image_mse", "m3ae/text_ce", "m3ae/text_accuracy"} <= set(out)
    want = out["m3ae/image_mse"] + 0.5 * out["m3ae/text_ce"]
    torch.testing.assert_close(out["m3ae_loss"], want)
    assert out["m3ae/text_ce"] > 0 and out["m3ae/image_mse"] > 0
    out["m3ae_loss"].backward()
    m3ae = task.objectives[1]
    assert not bad_grads(m3ae, every=True), "every decoder parameter gets a gradient"
    model = task.model
    for name in ("towers.image.patch_embed.weight", "towers.text.token_embed.weight", "fusion.type_embed"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert not any(k.startswith("fusion.") and "decoder" in k for k in model.state_dict())
    assert any(k.startswith("objectives.1.decoder.") for k in task.state_dict())


def test_m3ae_needs_a_single_stream_fusion_part(parts):
    transforms, _ = parts
    with pytest.raises(ConfigError, match="both streams .model.fusion.fusion: single.*'CrossFusion'"):
        m3ae_task(transforms, fusion="cross")
    with pytest.raises(ValueError, match="text 'image2' must be one of modalities"):
        M3AE.Config(text="image2")


def test_the_recipe_refuses_a_cross_fusion_part_at_load():
    from coalign.config import load_recipe

    assert load_recipe("m3ae").model.fusion.fusion == "single"
    with pytest.raises(ConfigError, match=r"model.fusion.fusion: 'm3ae' \(objectives.1\) needs a 'single'"):
        load_recipe("m3ae", ["model.fusion.fusion=cross"])
