"""CoCa captioning (issue #17): the captioning cross-entropy against brute force with padding ignored,
the objective on the model's own features, and the recipe checks around the decoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coalign.config import load_recipe
from coalign.models.decoder import valid_of
from coalign.objectives.caption import caption_loss
from coalign.objectives.task import Task
from coalign.registry import ConfigError
from parts import tiny_batch, tiny_decoder, tiny_model, transforms_for, world


def brute_caption_loss(logits: np.ndarray, ids: np.ndarray, valid: np.ndarray, eps: float) -> float:
    """Mean over (row, t) with a real token at t + 1 of -log softmax(logits[row, t])[ids[row, t + 1]],
    smoothed: (1 - eps) * that + eps * the mean of -log p over the vocabulary."""
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if not valid[b, t + 1]:
                continue
            z = logits[b, t] - logits[b, t].max()
            logp = z - math.log(np.exp(z).sum())
            total += (1 - eps) * -logp[ids[b, t + 1]] + eps * -logp.mean()
            count += 1
    return total / count


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_caption_loss_matches_brute_force_and_ignores_padding(eps):
    torch.manual_seed(0)
    M, L, V = 3, 7, 11
    ids = torch.randint(3, V, (M, L))
    valid = torch.arange(L)[None, :] < torch.tensor([7, 4, 2])[:, None]  # row 2: <bos> and one token
    ids[~valid] = 0  # padding
    logits = torch.randn(M, L, V, requires_grad=True)
    loss, accuracy = caption_loss(logits, ids, valid, eps)
    expected = brute_caption_loss(logits.detach().double().numpy(), ids.numpy(), valid.numpy(), eps)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # padding is ignored whatever its id and whatever is predicted there
    other_ids = torch.where(valid, ids, torch.randint(0, V, ids.shape))
    other_logits = torch.where(valid[..., None], logits.detach(), torch.randn(M, L, V) * 5)
    # the logits at the last real position of a row predict padding: they do not count either
    last = valid.long().sum(1) - 1
    other_logits[torch.arange(M), last] = torch.randn(M, V) * 5
    again, _ = caption_loss(other_logits, other_ids, valid, eps)
    assert again.item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert logits.grad[torch.arange(M), last].abs().sum() == 0, "no gradient from predictions of padding"
    hits = sum(
        int(logits[b, t].argmax() == ids[b, t + 1]) for b in range(M) for t in range(L - 1) if valid[b, t + 1]
    )
    assert accuracy.item() == pytest.approx(hits / int(valid[:, 1:].sum()))


def test_caption_loss_of_no_target_is_zero_and_attached():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    valid = torch.zeros(2, 4, dtype=torch.bool)
    valid[:, 0] = True  # <bos> alone: nothing to predict
    loss, _ = caption_loss(logits, torch.zeros(2, 4, dtype=torch.long), valid)
    assert loss.item() == 0.0 and loss.requires_grad


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    source = world(["image", "text"])
    transforms = transforms_for(["image", "text"], source, tmp_path_factory.mktemp("caption"))
    model = tiny_model(transforms, decoder=tiny_decoder("image", "text"))
    return source, transforms, model


def test_objective_is_the_loss_of_the_decoder_on_the_models_features(setup):
    """The objective reads the text tower's tokens that the contrastive loss also uses (one pass over
    the causal tower) for the rows that have both image and caption."""
    source, transforms, model = setup
    task = Task.from_specs(model, [_spec("clip"), _spec("caption", weight=2.0)], transforms)
    batch = tiny_batch(source, transforms, size=6, missing="text")
    out = task(batch)
    rows = batch["present"]["text"]  # the image is in every row
    text = model.towers["text"](batch["text"])
    logits = model.decoder(text, model.towers["image"](batch["image"][rows]))
    expected, _ = caption_loss(logits, batch["text"], valid_of(text))
    torch.testing.assert_close(out["caption_loss"], expected)
    torch.testing.assert_close(out["loss"], out["clip_loss"] + 2.0 * out["caption_loss"])


def _spec(name: str, **options):
    from coalign.config import ObjectiveSpec

    return ObjectiveSpec(name=name, **options)


def test_recipe_refuses_a_decoder_over_a_bidirectional_text_tower():
    with pytest.raises(ConfigError, match=r"model.towers.text.causal: .*must be causal"):
        load_recipe("coca", ["model.towers.text.causal=false"])


def test_recipe_refuses_captioning_without_a_decoder():
    with pytest.raises(ConfigError, match=r"objectives.1: 'caption' trains a caption decoder; add one"):
        load_recipe("coca", ["model.decoder=null"])


def test_recipe_refuses_a_decoder_over_a_missing_tower():
    with pytest.raises(ConfigError, match=r"model.decoder.context: the model has no 'audio' tower"):
        load_recipe("coca", ["model.decoder.context=audio"])


def test_recipe_refuses_a_decoder_vocabulary_smaller_than_the_tokenizer(tmp_path):
    from coalign.build import build_model, build_transforms

    recipe = load_recipe("coca", ["model.decoder.vocab_size=300"], smoke=True)
    transforms = build_transforms(recipe, views=False)
    transforms["text"].fit(world(["text"]), None)
    with pytest.raises(ConfigError, match=r"model.decoder.vocab_size: 300 is less than"):
        build_model(recipe, transforms)
