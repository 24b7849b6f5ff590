"""Multi-positive InfoNCE against brute-force loops (value and gradient), and the `captions: k` option
of the bpe transform that feeds it."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from coalign.data.collate import collate
from coalign.data.transforms.base import Pipeline
from coalign.data.transforms.text import PAD, BPETextTransform, train_bpe
from coalign.models.encoders.base import Tokens
from coalign.models.model import Features
from coalign.objectives.contrastive import info_nce
from coalign.objectives.multi_positive import MultiPositive, multi_positive_info_nce
from coalign.registry import OBJECTIVES, ConfigError


def brute_force(a, t, mask, scale):
    """1/2 [ mean_i -log sum_{c in pos(i)} e^{s_ic} / sum_{c in C} e^{s_ic}
    + mean_c -log e^{s_{i(c)c}} / sum_j e^{s_jc} ], with C the real captions, in explicit loops."""
    B, k = mask.shape
    captions = [(i, j) for i in range(B) for j in range(k) if mask[i, j]]  # (owner, slot)

    def s(i, c):
        return scale * (a[i] * t[c[0], c[1]]).sum()

    i2t, images = 0.0, 0
    for i in range(B):
        positives = [c for c in captions if c[0] == i]
        if not positives:
            continue  # an image without captions has nothing to retrieve
        num = sum(torch.exp(s(i, c)) for c in positives)
        den = sum(torch.exp(s(i, c)) for c in captions)
        i2t, images = i2t - torch.log(num / den), images + 1
    t2i = 0.0
    for c in captions:
        den = sum(torch.exp(s(j, c)) for j in range(B))
        t2i = t2i - torch.log(torch.exp(s(c[0], c)) / den)
    return 0.5 * (i2t / images + t2i / len(captions))


def _group(B=5, k=3, E=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(B, E, generator=g, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(B, k, E, generator=g, dtype=torch.float64), dim=-1)
    return a.requires_grad_(), t.requires_grad_()


def test_matches_brute_force_value_and_gradient_with_uneven_captions():
    a, t = _group()
    # 3, 1, 2, 0 and 3 captions: uneven groups, and one image with none (left out of image -> text).
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    fast = multi_positive_info_nce(a, t, mask, scale)
    fa, ft, fs = torch.autograd.grad(fast, (a, t, scale))
    slow = brute_force(a, t, mask, scale)
    sa, st, ss = torch.autograd.grad(slow, (a, t, scale))
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(fa, sa)
    torch.testing.assert_close(ft, st)
    torch.testing.assert_close(fs, ss)
    assert torch.isfinite(fa).all() and ft[~mask].abs().max() == 0  # padding slots get no gradient


def test_one_caption_per_image_is_info_nce():
    a, t = _group(k=1)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    mask = torch.ones(5, 1, dtype=torch.bool)
    torch.testing.assert_close(multi_positive_info_nce(a, t, mask, scale), info_nce(a, t[:, 0], scale))
    # More positives are easier than one: the same first caption plus two more scores a lower i2t term.
    a2, t2 = _group(k=3)
    three = multi_positive_info_nce(a2, t2, torch.ones(5, 3, dtype=torch.bool), scale)
    assert not torch.allclose(three, info_nce(a2, t2[:, 0], scale))


def _features(**embeddings):
    out = {}
    for name, (e, mask) in embeddings.items():
        out[name] = Features(Tokens(e[..., None, :], None), e, e, mask)
    return out


def test_objective_on_plain_text_equals_info_nce_and_pairs_present_rows():
    a, t = _group(B=6, k=2)
    a, t = a.detach().float(), t.detach().float()
    obj = MultiPositive(modalities=("image", "text"))
    out = obj(_features(image=(a, None), text=(t[:, 0], None)), {})
    torch.testing.assert_close(out["multi_positive_loss"], info_nce(a, t[:, 0], obj.scale()))
    assert out["captions_per_image"].item() == 1.0

    # Rows missing a modality drop out; the group mask follows the rows that stay.
    present = {
        "image": torch.tensor([1, 1, 0, 1, 1, 1]).bool(),
        "text@all": torch.tensor([1, 1, 1, 1, 0, 1]).bool(),
    }
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 1], [1, 1], [1, 0]]).bool()
    feats = _features(
        image=(a[present["image"]], None), **{"text@all": (t[present["text@all"]], mask[present["text@all"]])}
    )
    out = MultiPositive()(feats, {"present": present})
    both = present["image"] & present["text@all"]
    expected = multi_positive_info_nce(a[both], t[both], mask[both], obj.scale())
    torch.testing.assert_close(out["multi_positive_loss"], expected)


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="must differ"):
        OBJECTIVES.create("multi_positive", where="objectives.0", modalities=["text", "text"])
    with pytest.raises(KeyError, match="text@all"):
        MultiPositive()(_features(image=(torch.eye(2), None)), {})


# ------------------------------------------------------------------------------------ bpe captions: k

CAPTIONS = ["a red circle", "a blue square", "a small green cross", "a big yellow thing"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CAPTIONS * 3, 300)


def _bpe(tokenizer, **cfg):
    t = BPETextTransform(context_length=12, **cfg)
    t.tokenizer = tokenizer
    return t


def test_captions_k_draws_distinct_captions_and_pads(tokenizer):
    t = _bpe(tokenizer, captions=3)
    rows = t(CAPTIONS, np.random.default_rng(0))
    assert rows.shape == (3, 12) and (rows != PAD).any(dim=1).all()
    decoded = {tuple(r.tolist()) for r in rows}
    assert len(decoded) == 3  # without replacement
    assert decoded <= {tuple(r.tolist()) for r in t.encode(CAPTIONS)}
    # Other draws pick other subsets: the rng is used.
    subsets = {frozenset(tuple(r.tolist()) for r in t(CAPTIONS, np.random.default_rng(s))) for s in range(8)}
    assert len(subsets) > 1
    # Fewer captions than k: all of them, then all-<pad> rows ("no caption").
    two = t(CAPTIONS[:2], np.random.default_rng(0))
    assert two.shape == (3, 12) and (two[2] == PAD).all() and (two[:2] != PAD).any(dim=1).all()
    # Evaluation is unchanged: the first caption, (L,).
    torch.testing.assert_close(t.eval()(CAPTIONS, np.random.default_rng(0)), t.encode(CAPTIONS[:1])[0])


def test_captions_1_is_the_one_random_caption_draw(tokenizer):
    t = _bpe(tokenizer)
    rng = np.random.default_rng(5)
    expected = t.encode([CAPTIONS[int(np.random.default_rng(5).integers(len(CAPTIONS)))]])[0]
    torch.testing.assert_close(t(CAPTIONS, rng), expected)


def test_group_view_through_collate_and_model(tokenizer):
    """text@all with captions: 3 -> (B, 3, L) -> the model's group features -> a finite loss."""
    from coalign.models.encoders.text import TextConfig, TextTransformer
    from coalign.models.model import MultimodalModel

    transforms = {"text": _bpe(tokenizer), "text@all": _bpe(tokenizer, captions=3)}
    samples = [{"id": str(i), "text": CAPTIONS[: 1 + i % 4]} for i in range(4)]
    pipe = Pipeline(transforms)
    batch = collate([pipe(s, np.random.default_rng(i)) for i, s in enumerate(samples)], pipe.modalities())
    assert batch["text@all"].shape == (4, 3, 12)
    cfg = TextConfig(vocab_size=tokenizer.get_vocab_size(), context_length=12, width=16, depth=1, heads=2)
    towers = {"image": TextTransformer(cfg), "text": TextTransformer(cfg)}  # a text "image" tower will do
    model = MultimodalModel(towers, {m: torch.nn.Linear(16, 8) for m in towers}, 8)
    feats = model({"image": batch["text"], "text@all": batch["text@all"]})
    assert feats["text@all"].group_mask.sum(dim=1).tolist() == [1, 2, 3, 3]
    out = MultiPositive()(feats, batch)
    out["multi_positive_loss"].backward()
    assert math.isfinite(out["multi_positive_loss"].item()) and out["captions_per_image"].item() == 2.25
