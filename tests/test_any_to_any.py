"""Evaluation with several modalities and with modalities missing at test time, against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from coalign.data.sources.base import SkipCounter, Source, ZeroShotTask
from coalign.evaluate.any_to_any import combine
from coalign.evaluate.base import EvalContext, metric_dict
from coalign.evaluate.classification import classification_metrics
from coalign.evaluate.embed import EmbeddedSet, eval_batches
from coalign.registry import EVALUATORS
from coalign.runtime import Runtime

E, N, C = 16, 40, 4


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture
def eset():
    classes = unit(C, E, seed=1)
    labels = torch.arange(N) % C
    emb = {m: F.normalize(classes[labels] + 2.0 * unit(N, E, seed=s), dim=-1) for s, m in enumerate("abc", 2)}
    emb = {"audio": emb["a"], "image": emb["b"], "points": emb["c"]}
    captions = F.normalize(classes[labels] + 0.5 * unit(N, E, seed=9), dim=-1)
    return EmbeddedSet(
        "toy", emb, captions, torch.arange(N), {"y": labels}, {"y": ZeroShotTask("y", list("wxyz"), ["{}"])}
    ), classes


def ctx_for(classes):
    words = dict(zip("wxyz", classes, strict=True))
    encode = lambda texts: torch.stack([words[t] for t in texts])  # noqa: E731
    return EvalContext(None, {}, None, encode, Runtime.cpu(), 64)


def run(name, eset, ctx, **options):
    """The registered evaluator `name` with `options` on `eset`: its records' flat view."""
    return metric_dict(EVALUATORS.create(name, **options)(eset, ctx))


def zero_shot_fused(eset, ctx, **options):
    return run("zero_shot_fused", eset, ctx, **options)


def retrieval_given_rest(eset, ctx, **options):
    return run("retrieval_given_rest", eset, ctx, **options)


def zero_shot(eset, ctx):
    return run("zero_shot", eset, ctx)


def retrieval(eset, ctx):
    return run("retrieval", eset, ctx)


def test_fused_zero_shot_matches_brute_force(eset):
    eset, classes = eset
    out = zero_shot_fused(eset, ctx_for(classes))
    subsets = [s for r in (2, 3) for s in itertools.combinations(["audio", "image", "points"], r)]
    assert {k.split("/")[1] for k in out} == {"+".join(s) for s in subsets}
    for subset in subsets:
        q = F.normalize(sum(eset.embeddings[m] for m in subset) / len(subset), dim=-1)
        expect = classification_metrics(q @ classes.T, eset.labels["y"])["acc1"]
        assert out[f"zero_shot_fused/{'+'.join(subset)}/y/acc1"] == pytest.approx(expect)
    # fusing all three modalities beats each alone on this data (independent noise averages out)
    alone = zero_shot(eset, ctx_for(classes))
    assert out["zero_shot_fused/audio+image+points/y/acc1"] > max(
        alone[f"zero_shot/{m}/y/acc1"] for m in ("audio", "image", "points")
    )


def brute_recall_at(query, gallery, k):
    """Pessimistic rule by loops: a hit when fewer than k negatives score >= the positive."""
    hits = 0
    for i in range(len(query)):
        scores = [float(query[i] @ gallery[j]) for j in range(len(gallery))]
        hits += sum(s >= scores[i] for j, s in enumerate(scores) if j != i) < k
    return hits / len(query)


def test_given_rest_retrieval_with_product_is_the_multilinear_inner_product(eset):
    eset, classes = eset
    out = retrieval_given_rest(eset, ctx_for(classes), combine="product")
    assert sorted({k.split("/")[1] for k in out}) == ["audio", "image", "points", "text"]
    emb = {**eset.embeddings, "text": eset.captions}
    for target in emb:
        others = [m for m in emb if m != target]
        query = torch.ones(N, E)
        for m in others:
            query = query * emb[m]
        # the score of candidate j is the multilinear inner product <others..., target_j>
        j = 3
        mip = sum(
            float((emb[others[0]][0] * emb[others[1]][0] * emb[others[2]][0] * emb[target][j])[d])
            for d in range(E)
        )
        assert float(query[0] @ emb[target][j]) == pytest.approx(mip, abs=1e-6)
        for k in (1, 5):
            assert out[f"retrieval_given_rest/{target}/recall@{k}"] == pytest.approx(
                brute_recall_at(query, emb[target], k)
            )


def test_missing_modalities_are_left_out_of_each_metric(eset):
    eset, classes = eset
    present = {"audio": torch.arange(N) % 3 != 0, "image": torch.ones(N, dtype=torch.bool)}
    for m, mask in present.items():
        eset.embeddings[m] = (
            eset.embeddings[m] * mask[:, None]
        )  # absent rows are zeros, as embed_source makes
    eset.present = present
    zs = zero_shot(eset, ctx_for(classes))
    rows = present["audio"]
    expect = classification_metrics(eset.embeddings["audio"][rows] @ classes.T, eset.labels["y"][rows])
    assert zs["zero_shot/audio/y/acc1"] == pytest.approx(expect["acc1"])
    r = retrieval(eset, ctx_for(classes))
    q, g = eset.embeddings["audio"][rows], eset.embeddings["image"][rows]
    assert r["retrieval/audio-image/image_retrieval_recall@1"] == pytest.approx(brute_recall_at(q, g, 1))
    assert r["retrieval/audio-image/audio_retrieval_recall@1"] == pytest.approx(brute_recall_at(g, q, 1))
    caps = eset.captions[rows]
    assert r["retrieval/audio/image_retrieval_recall@5"] == pytest.approx(brute_recall_at(caps, q, 5))
    fused = zero_shot_fused(eset, ctx_for(classes))
    both = combine([eset.embeddings["audio"][rows], eset.embeddings["image"][rows]], "mean")
    expect = classification_metrics(both @ classes.T, eset.labels["y"][rows])["acc1"]
    assert fused["zero_shot_fused/audio+image/y/acc1"] == pytest.approx(expect)


class PartialSource(Source):
    """Every third sample has no audio; sample 5 has neither modality."""

    def __len__(self):
        return 9

    def __getitem__(self, i):
        s = {"id": str(i), "text": f"caption {i}", "label": {"y": i % 2}}
        if i != 5:
            s["image"] = np.full(2, i, dtype=np.float32)
        if i % 3 and i != 5:
            s["audio"] = np.full(3, i, dtype=np.float32)
        return s


def test_eval_batches_keep_samples_with_some_modalities():
    t = lambda v, rng: torch.as_tensor(v)  # noqa: E731
    skipped = SkipCounter()
    batches = list(
        eval_batches(PartialSource(), {"image": t, "audio": t}, ["image", "audio"], 4, None, skipped)
    )
    assert skipped == {"no_modality": 1}
    kept = [c[0] for b in batches for c in b.captions]
    assert kept == [f"caption {i}" for i in (0, 1, 2, 3, 4, 6, 7, 8)]
    assert [i for b in batches for i in b.indices] == [0, 1, 2, 3, 4, 6, 7, 8]
    audio_present = torch.cat([b.present["audio"] for b in batches]).tolist()
    assert audio_present == [i % 3 != 0 for i in (0, 1, 2, 3, 4, 6, 7, 8)]
    audio_values = torch.cat([b.values["audio"] for b in batches])[:, 0].tolist()
    assert audio_values == [1, 2, 4, 7, 8]


def test_fitted_protocols_use_only_the_samples_that_have_the_modality(eset):
    from coalign.evaluate.knn import knn_classify
    from coalign.evaluate.linear_probe import linear_probe

    test, classes = eset
    train = EmbeddedSet(
        "toy-train",
        {m: e.flip(0) for m, e in test.embeddings.items()},
        test.captions,
        test.caption_owner,
        {"y": test.labels["y"].flip(0)},
        test.tasks,
    )
    none = torch.zeros(N, dtype=torch.bool)
    some = torch.arange(N) % 4 != 0
    for s in (test, train):
        s.embeddings["points"] = s.embeddings["points"] * some[:, None]
        s.embeddings["audio"] = s.embeddings["audio"] * 0
        s.present = {"points": some, "audio": none}
    ctx = EvalContext(None, {}, None, None, Runtime.cpu(), 64, train=train)
    out = run("knn", test, ctx, k=5)
    assert not any("/audio/" in k for k in out)  # absent everywhere: no numbers, not numbers of zeros
    expect = knn_classify(
        train.embeddings["points"][some],
        train.labels["y"][some],
        test.embeddings["points"][some],
        test.labels["y"][some],
        C,
        k=5,
    )
    assert out["knn/points/y/knn_acc1"] == pytest.approx(expect["knn_acc1"])
    direct = linear_probe(
        train.embeddings["points"][some],
        train.labels["y"][some],
        test.embeddings["points"][some],
        test.labels["y"][some],
        C,
    )
    out = run("linear_probe", test, ctx)
    assert not any("/audio/" in k for k in out)
    assert out["linear_probe/points/y/lp_acc1"] == pytest.approx(direct["lp_acc1"])
