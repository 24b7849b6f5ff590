"""Text padding cut before encoding (`Encoder.trimmed_length`, `MultimodalModel.trim_lengths/cut`):
a batch of short captions is encoded at the width of its longest one, and nothing a tower computes
changes: the kept tokens, the pooled vectors, every objective's loss and gradient."""

from __future__ import annotations

import pytest
import torch

from coalign.models.encoders.text import TextConfig, TextTransformer
from coalign.objectives.task import Task
from coalign.registry import OBJECTIVES
from coalign.runtime import Runtime
from coalign.train.loop import forward_backward
from test_distributed import _assert_close, _grads, _reference, _setup, objectives_on_rank
from test_registries import needs_teacher

L = 16


def ids_with_lengths(lengths: list[int], pad: int = 0, eos: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (len(lengths), L), generator=g)
    for row, n in enumerate(lengths):
        ids[row, n:] = pad
        if eos is not None and n:
            ids[row, n - 1] = eos
    return ids


@pytest.mark.parametrize("pool", ["eos", "mean", "first"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("eos_id", [None, 3])
def test_cut_ids_give_the_same_tokens_and_pooled_vectors(pool, causal, eos_id):
    torch.manual_seed(0)
    cfg = TextConfig(
        vocab_size=50, context_length=L, width=32, depth=2, heads=2, pool=pool, causal=causal, eos_id=eos_id
    )
    tower = TextTransformer(cfg).eval()
    # the longest caption: 9 tokens; an empty row (with <eos> ids, just <eos>: a row without one is
    # all real tokens to such a tower, and is then not cut)
    ids = ids_with_lengths([5, 9, 2, 0 if eos_id is None else 1], eos=eos_id)
    if eos_id is not None:
        ids[0, 7] = 0  # CLIP's padding id is also a word: after <eos> it is not a real token
    assert tower.trimmed_length(ids) == 9
    full, cut = tower(ids), tower(ids[:, :9])
    real = full.mask[:, :9]
    assert torch.equal(cut.mask, real) and not full.mask[:, 9:].any()
    # exact in arithmetic; in floats a shorter sequence may block the matmuls otherwise (1.4e-6 seen
    # on an AMD EPYC in fp32)
    torch.testing.assert_close(cut.tokens[real], full.tokens[:, :9][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tower.pool(cut), tower.pool(full), atol=1e-5, rtol=1e-5)
    groups = torch.stack([ids, ids.flip(0)])  # (2, 4, L): groups of captions cut as one batch
    assert tower.trimmed_length(groups) == 9


def test_pool_last_is_not_cut_and_pads_a_cut_input_back():
    torch.manual_seed(0)
    cfg = TextConfig(vocab_size=50, context_length=L, width=32, depth=1, heads=2, pool="last")
    tower = TextTransformer(cfg).eval()
    ids = ids_with_lengths([5, 9])
    assert tower.trimmed_length(ids) is None  # position -1 is what it pools
    torch.testing.assert_close(tower.pool(tower(ids[:, :9])), tower.pool(tower(ids)))


def test_trim_padding_false_keeps_every_position():
    cfg = TextConfig(vocab_size=50, context_length=L, width=32, depth=1, heads=2, trim_padding=False)
    assert TextTransformer(cfg).trimmed_length(ids_with_lengths([5, 9])) is None


def shortened(model, batch: dict) -> dict:
    """The tiny world's captions fill the tiny tokenizer's context: end every one 4 tokens early
    (their last positions become padding), so the batch has padding to cut."""
    out = dict(batch)
    for key, value in batch.items():
        if key.startswith("text") and isinstance(value, torch.Tensor):
            out[key] = value.clone()
            out[key][..., -4:] = model.towers["text"].cfg.pad_id
    return out


# Objectives that draw a random choice per text position (which words to mask or hide): at another
# width they draw other numbers, from the same distribution, so their loss is not equal draw for draw.
PER_POSITION_DRAWS = ("mlm", "m3ae")


@pytest.mark.parametrize("name", [n for n in OBJECTIVES.names() if n not in PER_POSITION_DRAWS])
def test_a_training_step_on_the_cut_batch_has_the_uncut_loss_and_gradient(name, tmp_path, request):
    teacher = str(request.getfixturevalue("teacher")) if needs_teacher(name) else None
    objective, model, batch = _setup(name, tmp_path, teacher)
    if not any(k.startswith("text") for k in batch):
        pytest.skip(f"{name} reads no text")
    batch = shortened(model, batch)
    lengths = model.trim_lengths(batch)
    assert any(n < batch[k].shape[-1] for k, n in lengths.items()), f"{name}: nothing to cut ({lengths})"
    expected_loss, expected = _reference(objective, model, batch)
    task = Task(model, [objective], [1.0])
    torch.manual_seed(1)
    out = forward_backward(task, batch, 1, Runtime.cpu())
    assert abs(out["loss"].item() - expected_loss) < 1e-5, (out["loss"].item(), expected_loss)
    got = _grads([model, objective])
    assert got.keys() == expected.keys()
    for key in expected:
        _assert_close(got[key], expected[key], key)


def test_encode_cuts_and_gives_the_uncut_embeddings(tmp_path):
    objective, model, batch = _setup("clip", tmp_path, None)
    ids = shortened(model, batch)["text"]
    assert model.trim_lengths({"text": ids})["text"] < ids.shape[1]
    torch.testing.assert_close(model.encode("text", ids), model.features("text", ids).embedding)


def _ranks_worker(rank: int, names: list[str], root: str) -> None:
    from coalign.data.collate import split_batch
    from coalign.train.distributed import Dist, average_gradients

    for name, objective, model, batch in objectives_on_rank(rank, names, root):
        batch = shortened(model, batch)
        first, second = split_batch(batch, 2)
        second["text"][..., -6:] = model.towers["text"].cfg.pad_id  # rank 1's captions end sooner
        whole = {**batch, "text": torch.cat([first["text"], second["text"]])}
        expected_loss, expected = _reference(objective, model, whole)
        part = (first, second)[rank]
        own = model.trim_lengths(part)["text"]
        assert own == whole["text"].shape[-1] - (4, 6)[rank]  # the ranks alone would cut differently
        task = Task(model, [objective], [1.0])
        torch.manual_seed(1)
        out = forward_backward(task, part, 1, Runtime.cpu())  # the ranks agree on rank 0's width
        assert abs(out["loss"].item() - expected_loss) < 1e-5, (name, out["loss"].item(), expected_loss)
        average_gradients(task, Dist(rank, 2))
        got = _grads([model, objective])
        for key in expected:
            _assert_close(got[key], expected[key], f"{name} {key}")


@pytest.mark.slow
def test_two_ranks_with_different_caption_lengths_cut_to_one_width(tmp_path):
    """FILIP gathers text tokens and ITM the caption ids: both need one width on every rank."""
    import torch.multiprocessing as mp

    mp.spawn(_ranks_worker, args=(["clip", "filip", "itm"], str(tmp_path)), nprocs=2, join=True)


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_a_transformers_text_tower_cut_gives_the_same_pooled_vectors(pool):
    from coalign.models.encoders.hf_text import HFText, HFTextConfig

    torch.manual_seed(0)
    cfg = HFTextConfig(**{**HFTextConfig.tiny(), "vocab_size": 50, "context_length": L, "pool": pool})
    tower = HFText(cfg).eval()
    ids = ids_with_lengths([5, 9, 3])
    assert tower.trimmed_length(ids) == 9
    with torch.no_grad():
        torch.testing.assert_close(
            tower.pool(tower(ids[:, :9])), tower.pool(tower(ids)), atol=1e-6, rtol=1e-5
        )
