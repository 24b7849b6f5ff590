"""Caption generation (issue #17): greedy is beam search of width 1, beam search finds captions at
least as likely as greedy's, scores are the model's log-probabilities, top-p keeps its nucleus, and a
decoder trained to overfit four captions reproduces them."""

from __future__ import annotations

import pytest
import torch

from coalign.config import ObjectiveSpec
from coalign.models.generate import Captioner, Decoding, nucleus, top_p_draw
from coalign.objectives.task import Task
from coalign.registry import ConfigError
from parts import tiny_batch, tiny_decoder, tiny_model, transforms_for, world


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    torch.manual_seed(0)
    source = world(["image", "text"], size=8)
    transforms = transforms_for(["image", "text"], source, tmp_path_factory.mktemp("gen"))
    model = tiny_model(transforms, decoder=tiny_decoder("image", "text")).eval()
    return model, transforms, tiny_batch(source, transforms, size=8)["image"]


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """A tiny model whose decoder is trained on four captions until it predicts every next token."""
    torch.manual_seed(0)
    source = world(["image", "text"], size=4, captions=1, partial_caption_prob=0.0)
    transforms = transforms_for(["image", "text"], source, tmp_path_factory.mktemp("overfit"))
    model = tiny_model(transforms, decoder=tiny_decoder("image", "text"))
    task = Task.from_specs(model, [ObjectiveSpec(name="caption")], transforms)
    batch = tiny_batch(source, transforms, size=4)
    opt = torch.optim.AdamW(task.parameters(), lr=5e-3, weight_decay=0.0)
    for _ in range(200):
        out = task(batch)
        if out["caption/accuracy"] == 1.0 and out["caption_loss"] < 0.3:
            break
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["caption/accuracy"] == 1.0, "the tiny decoder should fit four captions"
    for t in transforms.values():
        t.eval()
    return model.eval(), transforms, batch


@torch.no_grad()
def teacher_forced_score(
    captioner: Captioner, images: torch.Tensor, tokens: list[int], stopped: bool
) -> float:
    """The sum of log p(token | prefix) over a caption (and its stop token), one forward pass."""
    ids = torch.tensor([[captioner.start, *tokens, *([captioner.stop] if stopped else [])]])
    text = captioner.tower(ids)
    logits = captioner.decoder.logits(text, captioner.memory(images[None]))[0].float()
    logp = torch.log_softmax(logits.masked_fill(captioner.blocked, float("-inf")), -1)
    return float(sum(logp[t, ids[0, t + 1]] for t in range(ids.shape[1] - 1)))


def test_greedy_is_beam_search_of_width_one(untrained):
    model, transforms, images = untrained
    captioner = Captioner.of(model, transforms["text"])
    greedy = captioner.generate(images, Decoding())
    beam = captioner.beam_search(captioner.memory(images), captioner.length(Decoding()), 1)
    assert greedy.tokens == beam.tokens
    torch.testing.assert_close(greedy.scores, beam.scores)


def test_scores_are_the_models_log_probabilities_and_specials_are_never_generated(untrained):
    model, transforms, images = untrained
    captioner = Captioner.of(model, transforms["text"])
    specials = set(transforms["text"].special_ids())
    for decoding in (Decoding(), Decoding(beam=3), Decoding(top_p=0.9, seed=1)):
        out = captioner.generate(images, decoding)
        for b, tokens in enumerate(out.tokens):
            assert not specials & set(tokens), f"{decoding}: generated a special token"
            expected = teacher_forced_score(captioner, images[b], tokens, bool(out.stopped[b]))
            assert out.scores[b].item() == pytest.approx(expected, abs=1e-4), decoding
            length = 1 + len(tokens) + int(out.stopped[b])
            assert length <= captioner.length(decoding)


def test_beam_search_scores_at_least_greedy(untrained, overfit):
    trained, trained_transforms, batch = overfit
    for model, transforms, images in (untrained, (trained, trained_transforms, batch["image"])):
        captioner = Captioner.of(model, transforms["text"])
        greedy = captioner.generate(images, Decoding())
        for width in (2, 4):
            beam = captioner.generate(images, Decoding(beam=width))
            assert (beam.scores >= greedy.scores - 1e-5).all(), (width, beam.scores, greedy.scores)


def test_max_length_cuts_captions_and_is_checked(untrained):
    model, transforms, images = untrained
    captioner = Captioner.of(model, transforms["text"])
    for decoding in (
        Decoding(max_length=3),
        Decoding(max_length=3, beam=2),
        Decoding(max_length=3, top_p=0.5),
    ):
        out = captioner.generate(images, decoding)
        assert all(1 + len(t) + int(s) <= 3 for t, s in zip(out.tokens, out.stopped, strict=True))
    too_long = captioner.context_length + 1
    with pytest.raises(ConfigError, match=f"max_length {too_long} exceeds the text tower's context length"):
        captioner.generate(images, Decoding(max_length=too_long))
    with pytest.raises(ConfigError, match="beam search or top-p sampling, not both"):
        Decoding(beam=2, top_p=0.5)


def test_the_tokenizers_stop_token_ends_a_caption(untrained):
    """Whichever id the tokenizer stops with: make the greedy caption's second token the stop id."""
    model, transforms, images = untrained
    captioner = Captioner.of(model, transforms["text"])
    first = captioner.generate(images[:1], Decoding()).tokens[0]
    assert len(first) >= 2, first
    sp = transforms["text"].specials
    other = Captioner(
        model, sp.bos, first[1], sp.pad, [s for s in transforms["text"].special_ids() if s != sp.eos]
    )
    out = other.generate(images[:1], Decoding())
    assert out.tokens[0] == first[:1] and bool(out.stopped[0])
    with pytest.raises(ConfigError, match="no start token"):
        Captioner(model, None, sp.eos, sp.pad, [])


def test_nucleus_is_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.05, 0.9, 0.03, 0.02]])
    assert nucleus(probs, 0.7).tolist() == [[True, False, True, False], [False, True, False, False]]
    assert nucleus(probs, 0.85).sum(-1).tolist() == [3, 1], "0.5 + 0.3 < 0.85: one of the 0.1s joins"
    assert nucleus(probs, 1e-6).sum(-1).tolist() == [1, 1], "the most probable token always"
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([top_p_draw(probs, 0.7, generator) for _ in range(200)])  # (200, 2)
    assert set(draws[:, 0].tolist()) == {0, 2} and set(draws[:, 1].tolist()) == {1}
    frac = (draws[:, 0] == 0).float().mean().item()
    assert 0.5 < frac < 0.75, "0.5 / (0.5 + 0.3) of the renormalised nucleus"


def test_top_p_sampling_is_seeded_and_a_tiny_nucleus_is_greedy(untrained):
    model, transforms, images = untrained
    captioner = Captioner.of(model, transforms["text"])
    a = captioner.generate(images, Decoding(top_p=0.95, seed=3, max_length=8))
    assert a.tokens == captioner.generate(images, Decoding(top_p=0.95, seed=3, max_length=8)).tokens
    tiny = captioner.generate(images, Decoding(top_p=1e-6, max_length=8)).tokens
    assert tiny == captioner.generate(images, Decoding(max_length=8)).tokens


def test_an_overfit_decoder_reproduces_its_captions(overfit):
    model, transforms, batch = overfit
    text = transforms["text"]
    captioner = Captioner.of(model, text)
    sp = text.specials
    references = [[t for t in row.tolist() if t not in (sp.bos, sp.eos, sp.pad)] for row in batch["text"]]
    for decoding in (Decoding(), Decoding(beam=3)):
        out = captioner.generate(batch["image"], decoding)
        assert out.tokens == references, decoding
        assert bool(out.stopped.all()), "each caption ends with the stop token"
        assert captioner.texts(text, out) == [text.decode(r) for r in references]
    assert all(len(t.split()) >= 3 for t in captioner.texts(text, out)), "words, not ids"
