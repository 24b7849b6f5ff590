"""ITM re-ranking (issue #16.6): the evaluators against a brute-force re-ranking that scores one
pair at a time through `MultimodalModel.fuse`, and re-ranking in `coalign search` / serve."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coalign.evaluate.classification import _fill
from coalign.evaluate.rerank import rerank_rows
from coalign.evaluate.run import evaluate
from coalign.models.fusion import Fusion
from coalign.registry import ConfigError
from coalign.runtime import Runtime
from parts import tiny_fusion, tiny_model, transforms_for, world


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    transforms = transforms_for(["image", "text"], world(["image", "text"]), tmp_path_factory.mktemp("rr"))
    for t in transforms.values():
        t.eval()
    model = tiny_model(transforms, fusion=tiny_fusion("image", "text", "cross")).eval()
    source = world(["image", "text"], "test", size=9, partial_caption_prob=0.0)
    return model, transforms, source


def test_rerank_rows_orders_the_top_k_by_score_above_the_rest():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.7]])
    itm = {0: 0.2, 3: 0.8, 2: 0.5}  # column -> ITM score of the row's top 3 (columns 0, 3, 2)
    out = rerank_rows(scores, 3, lambda q, c: torch.tensor([itm[int(j)] for j in c]))
    assert out[0].argsort(descending=True).tolist() == [3, 2, 0, 1]
    assert out[0, 1] == 0.1, "below the top k: the dual encoder's score"


def _itm(model, ids, image):
    """The ITM probability of one (caption ids, image) pair, or of features already computed."""
    with torch.no_grad():
        text = model.features("text", ids) if isinstance(ids, torch.Tensor) else ids
        image = model.features("image", image) if isinstance(image, torch.Tensor) else image
        fused = model.fuse({"text": text, "image": image})
        return float(Fusion.match_score(model.fusion, fused)[0])


def brute_force(model, transforms, source, k):
    """Recall@1/5 both ways: cosine top k, re-ordered by the ITM score of each pair fused alone."""
    rng = np.random.default_rng(0)
    images, caps, owner = [], [], []
    for i in range(len(source)):
        raw = source[i]
        images.append(transforms["image"](raw["image"], rng)[None])
        for c in raw["text"]:
            caps.append(transforms["text"].encode([c]))
            owner.append(i)
    with torch.no_grad():
        ie = torch.cat([model.encode("image", x) for x in images])
        te = torch.cat([model.encode("text", ids) for ids in caps])
    sims = te @ ie.T  # (T, I)

    def order(row_scores, pair):
        top = sorted(range(len(row_scores)), key=lambda j: -float(row_scores[j]))
        head = sorted(top[:k], key=lambda j: -pair(j))
        return head + top[k:]

    t2i = [order(sims[t], lambda i, t=t: _itm(model, caps[t], images[i])) for t in range(len(caps))]
    i2t = [order(sims[:, i], lambda t, i=i: _itm(model, caps[t], images[i])) for i in range(len(images))]
    out = {}
    for r in (1, 5):
        out[f"image_retrieval_recall@{r}"] = np.mean([owner[t] in t2i[t][:r] for t in range(len(caps))])
        out[f"text_retrieval_recall@{r}"] = np.mean(
            [any(owner[t] == i for t in i2t[i][:r]) for i in range(len(images))]
        )
    return out


@pytest.mark.parametrize("k", [1, 4])
def test_retrieval_rerank_equals_brute_force_and_reports_the_dual_encoder(setup, k):
    model, transforms, source = setup
    evaluators = ["retrieval", {"name": "retrieval_rerank", "k": k, "pairs_per_batch": 5}]
    flat = evaluate(model, transforms, {"s": source}, evaluators, Runtime.cpu(), batch_size=4).flat()["s"]
    expected = brute_force(model, transforms, source, k)
    for name, value in expected.items():
        assert flat[f"retrieval_rerank/image/{name}"] == pytest.approx(value), name
        assert flat[f"retrieval_rerank/image/dual_{name}"] == flat[f"retrieval/image/{name}"]
    if k == 1:  # one candidate re-ranked: the order cannot change
        for name in expected:
            assert flat[f"retrieval_rerank/image/{name}"] == flat[f"retrieval/image/{name}"]


def test_zero_shot_rerank_equals_brute_force(setup):
    model, transforms, source = setup
    evaluators = ["zero_shot", {"name": "zero_shot_rerank", "k": 100}, {"name": "zero_shot_rerank", "k": 1}]
    results = evaluate(model, transforms, {"s": source}, evaluators, Runtime.cpu(), batch_size=4)
    rerank = [m for m in results.metrics if m.evaluator == "zero_shot_rerank"]
    half = len(rerank) // 2  # the k=100 evaluator's records, then the k=1 one's
    full = {(m.label, m.name): m.value for m in rerank[:half]}
    one = {(m.label, m.name): m.value for m in rerank[half:]}
    dual = {(m.label, m.name): m.value for m in results.metrics if m.evaluator == "zero_shot"}
    rng = np.random.default_rng(0)
    with torch.no_grad():  # each sample's and each prompt's tower features once; pairs fused one by one
        images = [
            model.features("image", transforms["image"](source[i]["image"], rng)[None])
            for i in range(len(source))
        ]
    for key, task in source.zero_shot_tasks().items():
        with torch.no_grad():
            prompts = {
                (c, t): model.features("text", transforms["text"].encode([_fill(t, c)]))
                for c in task.classnames
                for t in task.templates
            }
        correct = []
        for i, image in enumerate(images):
            scores = [
                np.mean([_itm(model, prompts[c, t], image) for t in task.templates]) for c in task.classnames
            ]
            correct.append(int(np.argmax(scores)) == source[i]["label"][key])
        assert full[(key, "acc1")] == pytest.approx(np.mean(correct)), key
        assert one[(key, "acc1")] == dual[(key, "acc1")] == full[(key, "dual_acc1")]


def test_rerank_needs_a_fusion_part(setup):
    _, transforms, source = setup
    plain = tiny_model(transforms).eval()
    with pytest.raises(ConfigError, match="ITM head of a text-image fusion part"):
        evaluate(plain, transforms, {"s": source}, ["retrieval_rerank"], Runtime.cpu())


# ------------------------------------------------------------------------------- search and serve


@pytest.fixture(scope="module")
def fused_index(tmp_path_factory):
    """A 2-step smoke albef run, a world split embedded with it."""
    from coalign.config import load_recipe
    from coalign.search.embed import embed_source
    from coalign.train.loop import train

    root = tmp_path_factory.mktemp("rr_search")
    sizes = ["data.train.size=48", "data.eval={}", "eval.evaluators=[]", "train.steps=2", "data.batch_size=8"]
    train(load_recipe("albef", sizes, smoke=True), root / "run", progress=False)
    spec = {"source": "world", "split": "test", "size": 10}
    embed_source(root / "run", spec, root / "emb", batch_size=8, shard_size=8, progress=False)
    return root


def test_search_rerank_orders_the_top_k_by_itm(fused_index, capsys):
    import json

    from coalign.build import load_run
    from coalign.cli.search import build_parser
    from coalign.data.world import WorldSource

    emb = str(fused_index / "emb")
    parser = build_parser()
    args = parser.parse_args(["search", emb, "--text", "a red circle", "--k", "6", "--json"])
    assert args.func(args) == 0
    dual = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    args = parser.parse_args(["search", emb, "--text", "a red circle", "--k", "3", "--rerank", "5", "--json"])
    assert args.func(args) == 0
    reranked = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # brute force: the dual encoder's top 5, each fused alone with the query, best ITM first
    run = load_run(fused_index / "run")
    source, rng = WorldSource(split="test", size=10), np.random.default_rng(0)
    ids = run.transforms["text"].encode(["a red circle"])
    scored = []
    for hit in dual[:5]:
        image = run.transforms["image"](source[hit["row"]]["image"], rng)[None]
        scored.append((-_itm(run.model, ids, image), hit["row"]))
    expected = [row for _, row in sorted(scored)][:3]
    assert [h["row"] for h in reranked] == expected
    # the index's run scores in batches under its runtime's precision, the reference one pair at a time
    assert [h["score"] for h in reranked] == pytest.approx(sorted(-s for s, _ in scored)[:3], rel=1e-3)
    args = parser.parse_args(["search", emb, "--image", str(fused_index / "x.png"), "--rerank", "5"])
    with pytest.raises(ConfigError, match="needs a text query"):
        args.func(args)


def test_serve_rerank_field(fused_index, tiny_run):
    from fastapi.testclient import TestClient

    from coalign.search.embed import embed_source
    from coalign.search.query import SearchIndex
    from coalign.serve.app import create_app

    index = SearchIndex.load(fused_index / "emb")
    client = TestClient(create_app(index))
    plain = client.post("/search", json={"text": "a blue square", "k": 4}).json()["results"]
    got = client.post("/search", json={"text": "a blue square", "k": 2, "rerank": 4}).json()["results"]
    assert {h["id"] for h in got} <= {h["id"] for h in plain} and len(got) == 2
    assert got[0]["score"] >= got[1]["score"] and 0 <= got[1]["score"] <= 1  # ITM probabilities
    vector_query = client.post("/search", json={"vector": [1.0] * index.embed_dim, "rerank": 3})
    assert vector_query.status_code == 400 and "needs a text query" in vector_query.text
    # a dual-encoder run has no ITM head
    out = fused_index / "dual_emb"
    embed_source(tiny_run, {"source": "world", "split": "test", "size": 6}, out, batch_size=6, progress=False)
    dual = TestClient(create_app(SearchIndex.load(out)))
    answer = dual.post("/search", json={"text": "a blue square", "rerank": 3})
    # a dual-encoder app documents no `rerank` field at all: the request is outside its schema
    assert answer.status_code == 422 and "rerank" in answer.text
    assert "rerank" not in dual.get("/openapi.json").text
