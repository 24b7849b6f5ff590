"""anchored and all_pairs: against explicit loops of the `clip` objective (itself tested against
OpenCLIP), with missing modalities, skipped pairs, bind-time checks and a few training steps."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from coalign.models.encoders.base import Tokens
from coalign.models.model import Features
from coalign.objectives.base import aligned
from coalign.objectives.binding import AllPairs, Anchored
from coalign.objectives.contrastive import InfoNCE
from coalign.objectives.task import Task
from coalign.registry import OBJECTIVES, ConfigError
from helpers import brute_force_info_nce, descend

MODS = ["image", "text", "audio", "points"]


def _embeddings(names, B=6, E=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        m: F.normalize(torch.randn(B, E, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
        for m in names
    }


def _features(embeddings):
    return {m: Features(Tokens(e[:, None], None), e, e) for m, e in embeddings.items()}


def _clip(a, b, feats, batch):
    """The reference pairwise term: the `clip` objective on modalities (a, b), same temperature."""
    return InfoNCE(modalities=(a, b))(feats, batch)["clip_loss"]


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_anchored_matches_loop_of_clip_value_and_gradient(k, reduction):
    emb = _embeddings(MODS[:k])
    feats = _features(emb)
    obj = Anchored(anchor="text", modalities=MODS[:k], reduction=reduction)
    out = obj(feats, {})
    others = [m for m in MODS[:k] if m != "text"]
    terms = [_clip("text", m, feats, {}) for m in others]
    expected = sum(terms) / (len(terms) if reduction == "mean" else 1)
    torch.testing.assert_close(out["anchored_loss"], expected)
    leaves = list(emb.values())
    for got, want in zip(_grads(out["anchored_loss"], leaves), _grads(expected, leaves), strict=True):
        torch.testing.assert_close(got, want)
    assert set(out) == {"anchored_loss", "logit_scale", *(f"pair/text-{m}" for m in others)}
    for m, t in zip(others, terms, strict=True):
        torch.testing.assert_close(out[f"pair/text-{m}"], t.detach())


@pytest.mark.parametrize("k", [3, 4])
def test_all_pairs_matches_loop_of_clip_value_and_gradient(k):
    emb = _embeddings(MODS[:k], seed=1)
    feats = _features(emb)
    out = AllPairs(modalities=MODS[:k])(feats, {})
    pairs = list(itertools.combinations(MODS[:k], 2))
    assert len(pairs) == k * (k - 1) // 2
    terms = {p: _clip(*p, feats, {}) for p in pairs}
    expected = sum(terms.values()) / len(pairs)
    torch.testing.assert_close(out["all_pairs_loss"], expected)
    leaves = list(emb.values())
    for got, want in zip(_grads(out["all_pairs_loss"], leaves), _grads(expected, leaves), strict=True):
        torch.testing.assert_close(got, want)
    for (a, b), t in terms.items():
        torch.testing.assert_close(out[f"pair/{a}-{b}"], t.detach())
    # The shared temperature's gradient is the sum of the per-pair temperatures' gradients / #pairs.
    obj = AllPairs(modalities=MODS[:k])
    obj(feats, {})["all_pairs_loss"].backward()
    refs = [InfoNCE(modalities=p) for p in pairs]
    (sum(r(feats, {})["clip_loss"] for r in refs) / len(pairs)).backward()
    torch.testing.assert_close(obj.logit_scale.grad, sum(r.logit_scale.grad for r in refs))


def test_default_modalities_are_the_plain_keys_of_the_batch_sorted():
    emb = _embeddings(["text", "image", "audio"], seed=2)
    feats = _features(emb)
    feats["image@v1"] = feats["image"]  # a view is only used when named
    out = AllPairs()(feats, {})
    assert sorted(k for k in out if k.startswith("pair/")) == [
        "pair/audio-image",
        "pair/audio-text",
        "pair/image-text",
    ]
    expected = (
        sum(_clip(a, b, feats, {}) for a, b in [("audio", "image"), ("audio", "text"), ("image", "text")]) / 3
    )
    torch.testing.assert_close(out["all_pairs_loss"], expected)


def _missing_batch(B=7, seed=3):
    """Full embeddings plus present masks; each modality's features keep only its present rows."""
    full = _embeddings(["image", "text", "audio"], B=B, seed=seed)
    present = {
        "image": torch.tensor([1, 1, 1, 0, 1, 1, 1], dtype=torch.bool),
        "text": torch.tensor([1, 0, 1, 1, 1, 1, 0], dtype=torch.bool),
        "audio": torch.tensor([0, 1, 1, 1, 1, 0, 1], dtype=torch.bool),
    }
    leaves = {m: full[m].detach()[present[m]].clone().requires_grad_() for m in full}
    return full, present, leaves


@pytest.mark.parametrize(
    "cls,pairs",
    [
        (Anchored, [("image", "text"), ("image", "audio")]),
        (AllPairs, [("image", "text"), ("image", "audio"), ("text", "audio")]),
    ],
)
def test_missing_modalities_use_rows_with_both_and_backward_works(cls, pairs):
    full, present, leaves = _missing_batch()
    obj = (
        cls(anchor="image", modalities=["image", "text", "audio"])
        if cls is Anchored
        else cls(modalities=["image", "text", "audio"])
    )
    out = obj(_features(leaves), {"present": present})
    scale = obj.scale().detach().double()
    expected = []
    for a, b in pairs:
        both = present[a] & present[b]
        expected.append(brute_force_info_nce(full[a].detach()[both], full[b].detach()[both], scale))
    torch.testing.assert_close(out[f"{obj.name}_loss"], sum(expected) / len(expected))
    out[f"{obj.name}_loss"].backward()
    for leaf in leaves.values():
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    # Sample 0 (image + text) trains its image row; sample 6 (image + audio) its audio row.
    assert leaves["image"].grad[0].abs().sum() > 0
    assert leaves["audio"].grad[-1].abs().sum() > 0
    # Sample 3 has text + audio but no image: only all_pairs has a pair for it (text row 2 of 5).
    assert (leaves["text"].grad[2].abs().sum() > 0) == (cls is AllPairs)


def test_a_pair_with_fewer_than_two_rows_is_left_out():
    emb = _embeddings(["image", "text", "audio"], B=5, seed=4)
    present = {
        "image": torch.ones(5, dtype=torch.bool),
        "text": torch.ones(5, dtype=torch.bool),
        "audio": torch.tensor([0, 0, 1, 0, 0], dtype=torch.bool),
    }
    feats = _features({"image": emb["image"], "text": emb["text"], "audio": emb["audio"][2:3]})
    out = Anchored(anchor="image")(feats, {"present": present})
    assert "pair/image-audio" not in out
    torch.testing.assert_close(out["anchored_loss"], _clip("image", "text", feats, {}))


def test_no_pair_to_contrast_gives_an_attached_zero():
    emb = _embeddings(["image", "text"], B=4, seed=5)
    present = {
        "image": torch.tensor([1, 1, 0, 0], dtype=torch.bool),
        "text": torch.tensor([0, 0, 1, 1], dtype=torch.bool),
    }
    feats = _features({"image": emb["image"][:2], "text": emb["text"][2:]})
    for obj in (Anchored(anchor="image"), AllPairs()):
        out = obj(feats, {"present": present})
        assert out[f"{obj.name}_loss"].item() == 0.0
        out[f"{obj.name}_loss"].backward()
        assert obj.logit_scale.grad is not None and obj.logit_scale.grad.item() == 0.0
    # No anchor in the batch at all: also zero.
    out = Anchored(anchor="audio")(feats, {"present": present})
    assert out["anchored_loss"].item() == 0.0 and out["anchored_loss"].requires_grad


def test_aligned_selects_rows_with_every_key():
    full, present, leaves = _missing_batch()
    xs = aligned(_features(leaves), {"present": present}, ["image", "text", "audio"])
    every = present["image"] & present["text"] & present["audio"]
    for x, m in zip(xs, ["image", "text", "audio"], strict=True):
        torch.testing.assert_close(x, full[m].detach()[every])
    # A key without a present mask is present in every row.
    no_mask = {k: v for k, v in present.items() if k != "image"}
    feats = _features({"image": full["image"].detach(), "text": leaves["text"], "audio": leaves["audio"]})
    xi, xt = aligned(feats, {"present": no_mask}, ["image", "text"])
    torch.testing.assert_close(xi, full["image"].detach()[present["text"]])
    with pytest.raises(ValueError, match="feature rows"):
        aligned(_features(leaves), {"present": no_mask}, ["image", "text"])  # image has 6 rows, not 7
    with pytest.raises(KeyError, match="points"):
        aligned(_features(leaves), {}, ["image", "points"])


def test_bind_rejects_a_modality_without_a_tower():
    class Model(torch.nn.Module):
        towers = {"image": None, "text": None}

    with pytest.raises(ConfigError, match="audio"):
        OBJECTIVES.create("anchored", anchor="image", modalities=["image", "audio"]).bind(Model())
    with pytest.raises(ConfigError, match="must be one of modalities"):
        OBJECTIVES.create("anchored", anchor="audio", modalities=["image", "text"])
    OBJECTIVES.create("all_pairs", modalities=["image", "text@v1"]).bind(Model())  # a view of a tower is fine


def test_task_names_per_pair_metrics():
    class Fixed(torch.nn.Module):
        def forward(self, batch):
            return batch["features"]

    feats = _features({m: e.detach().float() for m, e in _embeddings(["image", "text", "audio"]).items()})
    out = Task(Fixed(), [Anchored(anchor="image")], [1.0])({"features": feats})
    assert {"anchored_loss", "anchored/pair/image-text", "anchored/pair/image-audio"} <= set(out)


@pytest.mark.parametrize("cls", [Anchored, AllPairs])
def test_a_few_steps_reduce_the_loss(cls):
    torch.manual_seed(0)
    raw = {m: torch.nn.Parameter(torch.randn(8, 6)) for m in ["image", "text", "audio"]}
    obj = cls(anchor="image") if cls is Anchored else cls()

    def loss():
        return obj(_features({m: F.normalize(p, dim=-1) for m, p in raw.items()}), {})[f"{obj.name}_loss"]

    first, last = descend(loss, [*raw.values(), *obj.parameters()])
    assert last < 0.5 * first
