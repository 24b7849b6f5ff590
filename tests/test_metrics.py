"""Retrieval and classification metrics against hand-worked answers."""

from __future__ import annotations

import math

import pytest
import torch

from coalign.evaluate.classification import class_embeddings, classification_metrics, confusion_matrix
from coalign.evaluate.retrieval import chunked_retrieval_metrics, retrieval_metrics

# 5 captions x 3 images. Captions 0,1 -> image 0; captions 2,3 -> image 1; caption 4 -> image 2.
SCORES = torch.tensor(
    [
        [0.9, 0.1, 0.2],  # c0: own image 0.9 is the top          -> t2i rank 0
        [0.5, 0.85, 0.1],  # c1: own 0.5 < 0.85                   -> t2i rank 1
        [0.3, 0.8, 0.45],  # c2: own 0.8 is the top               -> t2i rank 0
        [0.7, 0.2, 0.5],  # c3: own 0.2 < 0.7, 0.5                -> t2i rank 2
        [0.1, 0.5, 0.4],  # c4: own 0.4 < 0.5                     -> t2i rank 1
    ],
    dtype=torch.float64,
)
# image -> text, by column:
#   image 0: [0.9, 0.5, 0.3, 0.7, 0.1], best positive c0=0.9, nothing above          -> rank 0
#   image 1: [0.1, 0.85, 0.8, 0.2, 0.5], best positive c2=0.8, c1=0.85 above          -> rank 1
#   image 2: [0.2, 0.1, 0.45, 0.5, 0.4], positive c4=0.4, c2=0.45 and c3=0.5 above    -> rank 2
T2I = torch.tensor([0, 0, 1, 1, 2])


def test_retrieval_hand_example():
    m = retrieval_metrics(SCORES, T2I, ks=(1, 2, 3, 10))
    # t2i ranks [0, 1, 0, 2, 1]; k=10 is capped at 3 images.
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 5, abs=1e-12)
    assert m["image_retrieval_recall@2"] == pytest.approx(4 / 5, abs=1e-12)
    assert m["image_retrieval_recall@3"] == 1.0
    assert m["image_retrieval_recall@10"] == 1.0
    # i2t ranks [0, 1, 2]
    assert m["text_retrieval_recall@1"] == pytest.approx(1 / 3, abs=1e-12)
    assert m["text_retrieval_recall@2"] == pytest.approx(2 / 3, abs=1e-12)
    assert m["text_retrieval_recall@3"] == 1.0
    assert m["text_retrieval_recall@10"] == 1.0
    assert set(m) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 2, 3, 10)}


def test_retrieval_hand_example_chunked():
    # Recover SCORES as text_emb @ image_emb.T with image_emb = identity.
    for chunk in (1, 2, 4, 100):
        m = chunked_retrieval_metrics(
            SCORES, torch.eye(3, dtype=torch.float64), T2I, ks=(1, 2, 3, 10), chunk=chunk
        )
        assert m == retrieval_metrics(SCORES, T2I, ks=(1, 2, 3, 10))


def test_retrieval_ties_count_against_positive():
    # Pessimistic rule: a negative that ties the positive counts against it.
    scores = torch.tensor([[0.5, 0.5, 0.1], [0.3, 0.3, 0.9]])
    t2i = torch.tensor([0, 1])
    m = retrieval_metrics(scores, t2i, ks=(1, 2, 3))
    # t2i: c0 own image 0 = 0.5; negatives image 1 = 0.5 (tie, >=), image 2 = 0.1 -> rank 1.
    #      c1 own image 1 = 0.3; negatives image 0 = 0.3 (tie), image 2 = 0.9 -> rank 2.
    # ranks [1, 2] -> @1 0/2, @2 1/2, @3 2/2.
    assert m["image_retrieval_recall@1"] == 0.0
    assert m["image_retrieval_recall@2"] == 0.5
    assert m["image_retrieval_recall@3"] == 1.0
    # i2t: image 0 column [0.5, 0.3], positive c0 = 0.5, negative c1 = 0.3 -> rank 0.
    #      image 1 column [0.5, 0.3], positive c1 = 0.3, negative c0 = 0.5 -> rank 1.
    #      image 2 has no caption -> excluded. ranks [0, 1] -> @1 1/2, @2 2/2.
    assert m["text_retrieval_recall@1"] == 0.5
    assert m["text_retrieval_recall@2"] == 1.0


def test_retrieval_ties_image_to_text_only_negatives_count():
    # Captions 0, 1 -> image 0; captions 2, 3 -> image 1.
    scores = torch.tensor([[0.7, 0.2], [0.4, 0.5], [0.7, 0.8], [0.1, 0.8]])
    t2i = torch.tensor([0, 0, 1, 1])
    m = retrieval_metrics(scores, t2i, ks=(1, 2))
    # i2t: image 0 column [0.7, 0.4, 0.7, 0.1]: best positive s* = c0 = 0.7; negatives c2 = 0.7 (tie,
    #      counts) and c3 = 0.1 -> rank 1 -> miss@1, hit@2.
    #      image 1 column [0.2, 0.5, 0.8, 0.8]: positives c2 = c3 = 0.8 tie with each other, which never
    #      counts; negatives c0 = 0.2, c1 = 0.5 -> rank 0 -> hit@1.
    assert m["text_retrieval_recall@1"] == 0.5
    assert m["text_retrieval_recall@2"] == 1.0
    # t2i: c0 0.7 vs 0.2 -> 0; c1 0.4 vs 0.5 -> 1; c2 0.8 vs 0.7 -> 0; c3 0.8 vs 0.1 -> 0.
    assert m["image_retrieval_recall@1"] == 0.75
    assert m["image_retrieval_recall@2"] == 1.0
    for chunk in (1, 2, 3, 100):
        got = chunked_retrieval_metrics(scores, torch.eye(2), t2i, ks=(1, 2), chunk=chunk)
        assert got == m


def test_retrieval_collapsed_embeddings_score_worst_case():
    # A degenerate model: every embedding identical, so every score ties. It must not get 100% recall.
    # 4 captions, 3 images; captions 2, 3 share image 2.
    t2i = torch.tensor([0, 1, 2, 2])
    ks = (1, 2, 3, 4)
    # t2i: every caption has 2 negative images, both tied -> rank 2 -> @1 0, @2 0, @3 1, @4 1.
    # i2t: images 0, 1 have 3 negative captions each (rank 3); image 2 has 2 (rank 2).
    #      -> @1 0, @2 0, @3 1/3, @4 1.
    expected = {
        "image_retrieval_recall@1": 0.0,
        "image_retrieval_recall@2": 0.0,
        "image_retrieval_recall@3": 1.0,
        "image_retrieval_recall@4": 1.0,
        "text_retrieval_recall@1": 0.0,
        "text_retrieval_recall@2": 0.0,
        "text_retrieval_recall@3": pytest.approx(1 / 3, abs=1e-12),
        "text_retrieval_recall@4": 1.0,
    }
    assert retrieval_metrics(torch.ones(4, 3), t2i, ks=ks) == expected
    text, image = torch.full((4, 8), 0.25), torch.full((3, 8), 0.25)  # collapsed embeddings
    assert retrieval_metrics(text @ image.T, t2i, ks=ks) == expected
    for chunk in (1, 2, 3, 100):
        assert chunked_retrieval_metrics(text, image, t2i, ks=ks, chunk=chunk) == expected
    # Larger collapsed case: recall@1 is 0 in both directions whenever there is more than one image.
    text, image = torch.ones(50, 16), torch.ones(10, 16)
    t2i = torch.arange(50) % 10
    for m in (retrieval_metrics(text @ image.T, t2i), chunked_retrieval_metrics(text, image, t2i, chunk=7)):
        assert m["image_retrieval_recall@1"] == 0.0 and m["text_retrieval_recall@1"] == 0.0
    # With a single image there are no negatives, so everything is (trivially) a hit.
    m = retrieval_metrics(torch.ones(3, 1), torch.zeros(3, dtype=torch.long), ks=(1,))
    assert m == {"image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}


def test_retrieval_image_without_caption_excluded():
    # Image 1 has no caption; images 0 and 2 both rank their caption first, image 2 only second.
    scores = torch.tensor([[0.9, 0.0, 0.8], [0.95, 0.0, 0.7]])  # (T=2, I=3)
    m = retrieval_metrics(scores, torch.tensor([0, 2]), ks=(1,))
    # t2i: c0 own 0.9 top -> hit; c1 own 0.7 < 0.95 -> miss.
    assert m["image_retrieval_recall@1"] == 0.5
    # i2t: image 0 column [0.9, 0.95], positive 0.9 -> miss; image 2 [0.8, 0.7], positive 0.7 -> miss.
    assert m["text_retrieval_recall@1"] == 0.0
    m = retrieval_metrics(scores, torch.tensor([1, 2]), ks=(1, 2))
    # image 1: [0.0, 0.0] positive c0, negative c1 = 0.0 ties -> rank 1 -> miss@1, hit@2;
    # image 2: positive c1 = 0.7 < negative c0 = 0.8 -> rank 1 -> miss@1, hit@2.
    # Image 0 is excluded: counting it as a miss would make @2 equal 2/3 instead of 1.
    assert m["text_retrieval_recall@1"] == 0.0
    assert m["text_retrieval_recall@2"] == 1.0


def _random_case(seed: int, T: int, n_img: int, D: int, integer: bool):
    g = torch.Generator().manual_seed(seed)
    t2i = torch.randint(0, n_img - 2, (T,), generator=g)  # the last two images have no caption
    if integer:  # exact dot products and many ties
        image = torch.randint(-2, 3, (n_img, D), generator=g).double()
        text = image[t2i] + torch.randint(-1, 2, (T, D), generator=g).double()
    else:
        image = torch.randn(n_img, D, generator=g)
        text = image[t2i] + torch.randn(T, D, generator=g)
    return text, image, t2i


@pytest.mark.parametrize("integer", [True, False])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 16, 1000])
def test_chunked_matches_unchunked(chunk: int, integer: bool):
    text, image, t2i = _random_case(chunk, T=37, n_img=23, D=4, integer=integer)
    ks = (1, 3, 5, 10, 50)
    expected = retrieval_metrics(text @ image.T, t2i, ks=ks)
    assert chunked_retrieval_metrics(text, image, t2i, ks=ks, chunk=chunk) == expected
    if integer:  # the test must be able to see ties and misses
        assert 0 < expected["image_retrieval_recall@1"] < 1 and 0 < expected["text_retrieval_recall@1"] < 1


@pytest.mark.parametrize("chunk", [2, 5, 64])
def test_chunked_custom_score_fn(chunk: int):
    text, image, t2i = _random_case(3, T=19, n_img=11, D=3, integer=True)
    neg_l1 = lambda t, i: -(t[:, None, :] - i[None, :, :]).abs().sum(-1)
    ks = (1, 2, 5)
    expected = retrieval_metrics(neg_l1(text, image), t2i, ks=ks)
    assert chunked_retrieval_metrics(text, image, t2i, ks=ks, chunk=chunk, score_fn=neg_l1) == expected
    assert expected != retrieval_metrics(text @ image.T, t2i, ks=ks)


def test_chunked_matches_unchunked_with_infinite_scores():
    # -inf positives must not be beaten by the -inf fillers of the chunked top-k buffers.
    all_neg_inf = lambda t, i: torch.full((t.shape[0], i.shape[0]), -math.inf)
    text, image, t2i = torch.zeros(3, 2), torch.zeros(2, 2), torch.tensor([0, 0, 1])
    ks = (1, 2, 3)
    expected = retrieval_metrics(all_neg_inf(text, image), t2i, ks=ks)
    # t2i: every caption has 1 negative image, tied at -inf -> rank 1 -> @1 0, @2 1.
    # i2t: image 0 has 1 negative caption (rank 1), image 1 has 2 (rank 2) -> @1 0, @2 1/2, @3 1.
    assert expected == {
        "image_retrieval_recall@1": 0.0,
        "image_retrieval_recall@2": 1.0,
        "image_retrieval_recall@3": 1.0,
        "text_retrieval_recall@1": 0.0,
        "text_retrieval_recall@2": 0.5,
        "text_retrieval_recall@3": 1.0,
    }
    for chunk in (1, 2, 100):
        assert (
            chunked_retrieval_metrics(text, image, t2i, ks=ks, chunk=chunk, score_fn=all_neg_inf) == expected
        )

    def clipped(t: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        s = t @ i.T
        return torch.where(s < 0, -math.inf, torch.where(s > 3, math.inf, s))

    text, image, t2i = _random_case(5, T=29, n_img=9, D=3, integer=True)
    t2i[:12] = 0  # one image with many captions, so it has fewer negatives than the top-k buffer
    ks = (1, 2, 5, 20, 40)
    expected = retrieval_metrics(clipped(text, image), t2i, ks=ks)
    for chunk in (1, 2, 4, 7, 100):
        assert chunked_retrieval_metrics(text, image, t2i, ks=ks, chunk=chunk, score_fn=clipped) == expected


def test_retrieval_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(torch.ones(5), T2I)
    with pytest.raises(ValueError, match="4 entries"):
        retrieval_metrics(SCORES, T2I[:4])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        retrieval_metrics(SCORES, torch.tensor([0, 0, 1, 1, 3]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        retrieval_metrics(SCORES, torch.tensor([0, -1, 1, 1, 2]))
    with pytest.raises(ValueError, match="LongTensor"):
        retrieval_metrics(SCORES, T2I.float())
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(SCORES, T2I, ks=(0, 1))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.full((5, 3), math.nan), T2I)
    with pytest.raises(ValueError, match="dims differ"):
        chunked_retrieval_metrics(torch.ones(5, 4), torch.ones(3, 2), T2I)
    with pytest.raises(ValueError, match="chunk"):
        chunked_retrieval_metrics(torch.ones(5, 4), torch.ones(3, 4), T2I, chunk=0)
    with pytest.raises(ValueError, match="score_fn returned shape"):
        chunked_retrieval_metrics(torch.ones(5, 4), torch.ones(3, 4), T2I, score_fn=lambda t, i: t @ t.T)
    with pytest.raises(ValueError, match="NaN"):
        chunked_retrieval_metrics(torch.full((5, 4), math.nan), torch.ones(3, 4), T2I)


def test_classification_acc1_acc5():
    # Logits order the 7 classes 0 > 1 > ... > 6; targets sit at ranks 0, 3, 5, 6.
    logits = torch.arange(6.0, -1.0, -1.0).repeat(4, 1)  # (4, 7)
    m = classification_metrics(logits, torch.tensor([0, 3, 5, 6]))
    assert m["acc1"] == 0.25  # only rank 0
    assert m["acc5"] == 0.5  # ranks 0 and 3
    # Every prediction is class 0: recall 1 for class 0, 0 for classes 3, 5, 6.
    assert m["mean_per_class_recall"] == 0.25
    assert "acc5" not in classification_metrics(torch.randn(3, 5), torch.tensor([0, 1, 4]))


def test_classification_ties_go_to_lowest_index():
    logits = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    m = classification_metrics(logits, torch.tensor([0, 1]))
    assert m["acc1"] == 0.5  # prediction is class 0 for both rows


def test_mean_per_class_recall_differs_from_acc1():
    # Imbalanced: 4 samples of class 0, one each of classes 1 and 2; class 3 never a target.
    targets = torch.tensor([0, 0, 0, 0, 1, 2])
    preds = torch.tensor([0, 0, 0, 0, 3, 2])
    logits = torch.nn.functional.one_hot(preds, 4).float()  # (6, 4)
    m = classification_metrics(logits, targets)
    assert m["acc1"] == pytest.approx(5 / 6, abs=1e-12)
    # recalls: class 0 -> 4/4, class 1 -> 0/1, class 2 -> 1/1; class 3 is absent from targets, not averaged.
    assert m["mean_per_class_recall"] == pytest.approx(2 / 3, abs=1e-12)


def test_confusion_matrix():
    cm = confusion_matrix(torch.tensor([0, 2, 1, 1]), torch.tensor([0, 1, 1, 2]), 3)
    assert cm.dtype == torch.long
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [0, 1, 0]]  # rows = true class
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="entries"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)


def test_classification_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        classification_metrics(torch.ones(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        classification_metrics(torch.ones(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="entries"):
        classification_metrics(torch.ones(2, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="LongTensor"):
        classification_metrics(torch.ones(2, 3), torch.tensor([0.0, 1.0]))


VECTORS = {
    "a cat": [3.0, 0.0],  # -> [1, 0] after normalising
    "the cat": [0.0, 5.0],  # -> [0, 1]; mean [0.5, 0.5] -> [1/sqrt2, 1/sqrt2] (raw mean would tilt to y)
    "a dog": [-2.0, 0.0],  # -> [-1, 0]
    "the dog": [-1.0, 0.0],  # -> [-1, 0]; mean -> [-1, 0]
}


def test_class_embeddings_average_and_normalise():
    calls: list[list[str]] = []

    def encode(prompts: list[str]) -> torch.Tensor:
        calls.append(prompts)
        return torch.tensor([VECTORS[p] for p in prompts])

    emb = class_embeddings(encode, ["cat", "dog"], ["a {}", "the {c}"])
    assert calls == [["a cat", "the cat", "a dog", "the dog"]]  # one call, class-major order
    r = 1 / math.sqrt(2)
    assert torch.allclose(emb, torch.tensor([[r, r], [-1.0, 0.0]]), atol=1e-6, rtol=0)


def test_class_embeddings_bad_inputs():
    encode = lambda prompts: torch.ones(len(prompts), 2)
    with pytest.raises(ValueError, match="placeholder"):
        class_embeddings(encode, ["cat"], ["a photo"])
    with pytest.raises(ValueError, match="must use"):
        class_embeddings(encode, ["cat"], ["a {classname}"])
    with pytest.raises(ValueError, match="empty"):
        class_embeddings(encode, [], ["a {}"])
    with pytest.raises(ValueError, match="expected"):
        class_embeddings(lambda p: torch.ones(1, 2), ["cat", "dog"], ["a {}"])


def test_chunked_classification_equals_unchunked_on_random_data():
    from coalign.evaluate.classification import chunked_classification_metrics

    g = torch.Generator().manual_seed(3)
    feats, classes = torch.randn(257, 8, generator=g), torch.randn(11, 8, generator=g)
    feats[5] = feats[4]  # duplicates and exact ties between classes exercise the tie rule
    classes[7] = classes[2]
    targets = torch.randint(0, 11, (257,), generator=g)
    expected = classification_metrics(feats @ classes.T, targets)
    for chunk in (1, 16, 100, 1000):
        assert chunked_classification_metrics(feats, classes, targets, chunk=chunk) == expected
    with pytest.raises(ValueError, match="must share D"):
        chunked_classification_metrics(feats, classes[:, :4], targets)
