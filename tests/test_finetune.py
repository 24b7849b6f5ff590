"""Locked towers (LiT), unlocking the last blocks, frozen norms, cached features of a locked tower,
`model.init_from`, and `coalign interpolate` (WiSE-FT): behaviour on tiny runs of the demo recipe."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from coalign.build import build_model, build_transforms, input_differences, load_run
from coalign.checkpoint import WEIGHTS, latest_checkpoint, load_weights, model_weights
from coalign.cli import main
from coalign.config import load_recipe
from coalign.data.loader import train_batches
from coalign.data.transforms.text import BPETextTransform, train_bpe
from coalign.interpolate import interpolate_weights
from coalign.registry import ConfigError
from coalign.runtime import Runtime
from coalign.train.loop import train, train_step
from coalign.train.session import setup

TINY = [  # the demo at a tiny size (not --smoke, which would cut the text tower to one block)
    "data.train.size=64",
    "data.eval.heldout_samples.size=16",
    "data.eval.heldout_combos.size=16",
    "data.batch_size=8",
    "data.transforms.image.size=32",
    "data.transforms.text={transform: bpe, context_length: 16, vocab_size: 300, fit_samples: 64}",
    "model.embed_dim=16",
    "model.towers.image={encoder: vit, stem: conv, patch_size: 8, width: 32, depth: 1, heads: 2, pool: mean}",
    "model.towers.text={encoder: text_transformer, width: 32, depth: 2, heads: 2, pool: mean}",
    "train.steps=2",
    "train.warmup_steps=0",
    "train.log_every=1",
    "train.checkpoint_every=1",
]


def recipe(*overrides: str):
    return load_recipe("demo", [*TINY, *overrides])


def one_step(tmp_path, *overrides: str):
    """A session of the recipe, the tower weights before, and the state after one training step."""
    session = setup(recipe(*overrides), tmp_path / "run", runtime=Runtime.cpu())
    model = session.state.task.model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batch = next(train_batches(session.source, session.pipeline, 8, 0, 0))
    session.state.task.train()
    assert train_step(session.state, batch, session.recipe, session.runtime) is not None
    return session, model, before


def changed(model, before, prefix: str) -> dict[str, bool]:
    return {k: not torch.equal(v, before[k]) for k, v in model.state_dict().items() if k.startswith(prefix)}


def optimised(session) -> set[int]:
    return {id(p) for g in session.state.optimizer.param_groups for p in g["params"]}


# ------------------------------------------------------------------------------------------ locking


def test_locked_tower_gets_no_gradient_no_state_and_stays_in_eval_mode(tmp_path):
    session, model, before = one_step(tmp_path, "model.towers.text.lock=true")
    text = model.towers["text"]
    assert not any(changed(model, before, "towers.text.").values())
    assert all(changed(model, before, "heads.text.").values()), "the locked tower's head still trains"
    assert any(changed(model, before, "towers.image.").values())
    assert all(p.grad is None for p in text.parameters())
    held = optimised(session)
    assert not any(id(p) in held for p in text.parameters())
    assert not any(p in session.state.optimizer.state for p in text.parameters())
    assert all(p in session.state.optimizer.state for p in model.heads["text"].parameters())
    assert not text.training and model.towers["image"].training


def test_unlock_last_trains_the_last_blocks_and_what_follows(tmp_path):
    session, model, _ = one_step(tmp_path, "model.towers.text.lock=true", "model.towers.text.unlock_last=1")
    text = model.towers["text"]
    first, last = text.transformer.blocks
    assert all(p.grad is None for p in [*first.parameters(), text.token_embed.weight, text.pos_embed])
    assert all(p.grad is not None for p in last.parameters())
    assert all(p.grad is not None for p in text.transformer.norm.parameters())
    assert text.training  # partly trainable: dropout and norms behave as in training


def test_unlock_last_beyond_the_blocks_and_without_lock_fail_at_start():
    with pytest.raises(ValueError, match="more than the 2 blocks"):
        r = recipe("model.towers.text.lock=true", "model.towers.text.unlock_last=3")
        build_model(r, {m: t for m, t in _fitted(r).items()})
    with pytest.raises(ConfigError, match="unlock_last needs lock: true"):
        recipe("model.towers.text.unlock_last=1")


def _fitted(r):
    from coalign.build import build_source

    transforms = build_transforms(r, views=False)
    for t in transforms.values():
        t.fit(build_source(r.data.train, "data.train"), None)
    return transforms


def test_freeze_norm_keeps_norm_weights_and_batch_statistics(tmp_path):
    session, model, before = one_step(tmp_path, "model.towers.image.freeze_norm=true")
    image = model.towers["image"]
    norms = [n for n, m in image.named_modules() if isinstance(m, torch.nn.BatchNorm2d | torch.nn.LayerNorm)]
    assert any("stem" in n or isinstance(image.get_submodule(n), torch.nn.BatchNorm2d) for n in norms)
    moved = changed(model, before, "towers.image.")
    norm_keys = [
        k
        for k in moved
        if any(
            k == f"towers.image.{n}.{leaf}"
            for n in norms
            for leaf in ("weight", "bias", "running_mean", "running_var")
        )
    ]
    assert norm_keys and not any(moved[k] for k in norm_keys)
    assert any(v for k, v in moved.items() if k not in norm_keys), "the rest of the tower trains"


def test_cached_locked_tower_gives_the_same_features_and_losses(tmp_path):
    plain = setup(recipe("model.towers.text.lock=true"), tmp_path / "a", runtime=Runtime.cpu())
    cached = setup(
        recipe("model.towers.text.lock=true", "model.towers.text.cache=true"),
        tmp_path / "b",
        runtime=Runtime.cpu(),
    )
    batch = next(train_batches(plain.source, plain.pipeline, 8, 0, 0))
    for s in (plain, cached):
        s.state.task.train()
    for _ in range(2):  # the second pass reads every row from the cache
        a, b = plain.state.task(batch), cached.state.task(batch)
        torch.testing.assert_close(a["loss"], b["loss"], rtol=0, atol=0)
    cache = cached.state.task.model.caches["text"]
    assert cache.hits >= 8 and len(cache) == len({tuple(r.tolist()) for r in batch["text"]})
    with pytest.raises(ConfigError, match="cache needs a fully locked tower"):
        recipe("model.towers.text.cache=true")


# ------------------------------------------------------------------------------------------ init_from


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained runs of one architecture and one tokenizer (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("runs")
    train(recipe(), root / "a", progress=False)
    tok = f"data.transforms.text.path={root / 'a' / 'tokenizer.json'}"
    train(recipe("seed=1", tok), root / "b", progress=False)
    return root / "a", root / "b"


def test_init_from_copies_every_weight_exactly(runs, tmp_path):
    a, _ = runs
    tok = f"data.transforms.text.path={a / 'tokenizer.json'}"
    session = setup(recipe(f"model.init_from={a}", tok, "seed=5"), tmp_path / "run", runtime=Runtime.cpu())
    source = model_weights(load_weights(latest_checkpoint(a)))
    ours = session.state.task.model.state_dict()
    assert set(ours) == set(source)
    assert all(torch.equal(ours[k], source[k]) for k in source)


def test_init_from_a_subset_of_towers(runs, tmp_path):
    a, _ = runs
    overrides = [f"model.init_from={{run: {a}, towers: [image]}}", "seed=5"]
    model = setup(recipe(*overrides), tmp_path / "run", runtime=Runtime.cpu()).state.task.model
    source = model_weights(load_weights(latest_checkpoint(a)))
    ours = model.state_dict()
    for k in ours:
        same = torch.equal(ours[k], source[k])
        if k.startswith(("towers.image.", "heads.image.")):
            assert same, k
        elif k.startswith("towers.text.") and ours[k].is_floating_point() and ours[k].numel() > 1:
            assert not same, f"{k} was copied but text is not in init_from.towers"


def test_init_from_refuses_what_does_not_fit(runs, tmp_path):
    a, _ = runs
    with pytest.raises(ConfigError, match=r"init_from: '.*' does not fit this model: .*of another shape"):
        setup(
            recipe(f"model.init_from={a}", "model.towers.image.width=48"),
            tmp_path / "x",
            runtime=Runtime.cpu(),
        )
    with pytest.raises(ConfigError, match="no run or checkpoint folder"):
        setup(recipe(f"model.init_from={tmp_path / 'none'}"), tmp_path / "y", runtime=Runtime.cpu())
    with pytest.raises(ConfigError, match=r"init_from.towers names \['audio'\]"):
        recipe(f"model.init_from={{run: {a}, towers: [audio]}}")


def test_input_differences_tells_tokenizers_apart():
    one, two = BPETextTransform(), BPETextTransform()
    one.tokenizer = train_bpe(["a red circle", "a blue square"] * 20, 300)
    two.tokenizer = train_bpe(["a red cirque", "a blue squash"] * 20, 300)  # as many tokens, other ones
    assert one.tokenizer.get_vocab_size() == two.tokenizer.get_vocab_size()
    assert input_differences({"text": one}, {"text": two}, ["text"]) == ["text: another tokenizer"]
    assert input_differences({"text": one}, {"text": one}, ["text"]) == []


# ------------------------------------------------------------------------------------------ interpolate


def test_interpolate_weights_formula():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor(7)}
    out = interpolate_weights(a, b, 0.25)
    torch.testing.assert_close(out["w"], torch.tensor([1.0, 3.0]))
    assert int(out["n"]) == 7


def test_interpolate_writes_a_run_of_the_mixed_weights(runs, tmp_path, capsys):
    a, b = runs
    out = tmp_path / "wise"
    assert main(["interpolate", str(a), str(b), "--alpha", "0.25", str(out)]) == 0
    wa, wb = load_weights(latest_checkpoint(a)), load_weights(latest_checkpoint(b))
    mixed = load_file(str(latest_checkpoint(out) / WEIGHTS))
    assert set(mixed) == set(wb)
    for k, v in mixed.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.75 * wa[k] + 0.25 * wb[k])
    run = load_run(out)  # a run like any other: its recipe, tokenizer and checkpoint
    assert (
        run.transforms["text"].tokenizer.get_vocab() == load_run(b).transforms["text"].tokenizer.get_vocab()
    )
    assert main(["interpolate", str(a), str(b), "--alpha", "0.5", str(out)]) == 2  # OUT is not overwritten
    assert "already holds a run" in capsys.readouterr().err


def test_a_run_with_weights_only_is_not_resumed_but_says_how_to_train_from_it(runs, tmp_path, capsys):
    a, b = runs
    out = tmp_path / "wise"
    assert main(["interpolate", str(a), str(b), "--alpha", "0.5", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "weight interpolation" in err and "no optimizer state" in err and "model.init_from" in err


def test_interpolate_refuses_other_architectures_in_one_line(runs, tmp_path, capsys):
    a, _ = runs
    wide = tmp_path / "wide"
    tok = f"data.transforms.text.path={a / 'tokenizer.json'}"
    train(recipe("train.steps=1", "model.embed_dim=24", tok), wide, progress=False)
    assert main(["interpolate", str(a), str(wide), "--alpha", "0.5", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "differ in architecture" in err and "of another shape" in err
    assert not (tmp_path / "out").exists()
    assert main(["interpolate", str(a), str(wide), "--alpha", "1.5", str(tmp_path / "out")]) == 2
    assert "must lie in [0, 1]" in capsys.readouterr().err


def test_sweep_table_holds_each_alpha_and_its_ends_match_the_runs(runs, tmp_path, capsys):
    from coalign.evaluate.results import Results

    a, b = runs
    table = tmp_path / "sweep"
    assert main(["interpolate", str(a), str(b), "--sweep", "0", "0.5", "1", "--table", str(table)]) == 0
    md = table.with_suffix(".md").read_text()
    assert all(f"alpha={x}" in md.splitlines()[0] for x in ("0", "0.5", "1"))
    import json

    per_alpha = json.loads(table.with_suffix(".json").read_text())["results"]
    for alpha, run in (("0", a), ("1", b)):
        mine = Results.from_json(per_alpha[alpha]).flat()
        direct = _evaluate(run)
        for dataset, values in direct.items():
            for key, value in values.items():
                assert mine[dataset][key] == pytest.approx(value, abs=1e-6), (alpha, dataset, key)


def _evaluate(run_dir):
    from coalign.build import build_source
    from coalign.evaluate.run import evaluate

    run = load_run(run_dir, Runtime.create())  # the runtime `coalign eval` and the sweep use
    sources = {k: build_source(s, k) for k, s in run.recipe.data.eval.items()}
    return evaluate(
        run.model,
        run.transforms,
        sources,
        run.recipe.eval.evaluators,
        Runtime.create(),
        256,
        run.recipe.eval.max_samples,
    ).flat()
