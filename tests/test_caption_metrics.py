"""Caption metrics (issue #17): BLEU-4 against nltk's corpus BLEU, CIDEr-D against the formula of
Vedantam et al. written out, and the world's attribute words parsed back from captions."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("pycocoevalcap")

from coalign.data.world import ATTRIBUTES, Attributes, caption  # noqa: E402
from coalign.evaluate.captioning import attribute_accuracy, bleu4_cider_d, parse_attributes, tokenize  # noqa: E402

CANDIDATES = [
    "a small red circle near the top",
    "a big blue square, on the left",
    "the green thing at the bottom",
]
REFERENCES = [
    ["a small red circle at the top", "a tiny red circle near the top", "red circle, small, top"],
    ["a large blue square on the left", "a big blue square at the left side"],
    ["a green triangle at the bottom", "a green small triangle near the bottom", "green triangle"],
]


def test_bleu4_matches_nltk_corpus_bleu():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    refs = [[tokenize(r).split() for r in rs] for rs in REFERENCES]
    hyps = [tokenize(c).split() for c in CANDIDATES]
    expected = nltk_bleu.corpus_bleu(refs, hyps)  # uniform weights over 1-4 grams, closest ref length
    assert bleu4_cider_d(CANDIDATES, REFERENCES)["bleu4"] == pytest.approx(expected, rel=1e-5)


def ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def brute_cider_d(candidates: list[str], references: list[list[str]], sigma: float = 6.0) -> float:
    """CIDEr-D: 10 x the mean over n = 1..4 of the mean over references of the clipped tf-idf cosine,
    times exp(-(len(c) - len(r))^2 / (2 sigma^2)); df over the references of the set."""
    cands = [tokenize(c).split() for c in candidates]
    refs = [[tokenize(r).split() for r in rs] for rs in references]
    N = len(cands)
    df = Counter()
    for rs in refs:
        for n in range(1, 5):
            df.update({g for r in rs for g in ngrams(r, n)})

    def vec(words, n):
        tf = ngrams(words, n)
        return {g: c * (math.log(N) - math.log(max(1.0, df[g]))) for g, c in tf.items()}

    scores = []
    for c, rs in zip(cands, refs, strict=True):
        per_n = []
        for n in range(1, 5):
            vc = vec(c, n)
            sims = []
            for r in rs:
                vr = vec(r, n)
                norm = math.sqrt(sum(v * v for v in vc.values())) * math.sqrt(sum(v * v for v in vr.values()))
                dot = sum(min(vc[g], vr[g]) * vr[g] for g in vc if g in vr)
                penalty = math.exp(-((len(c) - len(r)) ** 2) / (2 * sigma**2))
                sims.append(penalty * dot / norm if norm else 0.0)
            per_n.append(np.mean(sims))
        scores.append(10.0 * np.mean(per_n))
    return float(np.mean(scores))


def test_cider_d_matches_the_formula():
    got = bleu4_cider_d(CANDIDATES, REFERENCES)["cider_d"]
    assert got == pytest.approx(brute_cider_d(CANDIDATES, REFERENCES), rel=1e-6)
    perfect = bleu4_cider_d([r[0] for r in REFERENCES], REFERENCES)
    assert perfect["cider_d"] > got and perfect["bleu4"] > bleu4_cider_d(CANDIDATES, REFERENCES)["bleu4"]


def test_world_captions_parse_back_to_their_attributes():
    rng = np.random.default_rng(0)
    for _ in range(200):
        labels = {k: int(rng.integers(len(v))) for k, v in ATTRIBUTES.items()}
        attrs = Attributes(*(ATTRIBUTES[k][labels[k]] for k in ("shape", "color", "size", "position")))
        assert parse_attributes(caption(attrs, rng)) == labels


def test_attribute_accuracy_counts_missing_and_contradictory_words_wrong():
    texts = ["a small red circle near the top", "a red circle", "a red and blue circle at the bottom"]
    labels = {"shape": [0, 0, 0], "color": [0, 0, 0], "size": [0, 0, 0], "position": [0, 0, 1]}
    acc = attribute_accuracy(texts, labels)
    assert acc == pytest.approx(
        {"shape": 1.0, "color": 2 / 3, "size": 1 / 3, "position": 2 / 3, "all": 1 / 3}
    )
