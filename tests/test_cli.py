"""The command line end to end on the built-in world (smoke-sized)."""

import pytest

from coalign.cli import main
from coalign.evaluate.results import read_results


def test_list_prints_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for kind in ("sources:", "transforms:", "encoders:", "objectives:", "evaluators:", "recipes:"):
        assert kind in out
    assert "world" in out and "clip" in out and "demo" in out


def test_bad_recipe_fails_before_any_work(tmp_path, capsys):
    assert main(["train", "demo", "train.stpes=3", "--out", str(tmp_path / "r")]) == 2
    assert "did you mean 'steps'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_train_smoke_then_eval(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [
        "data.train.size=64",
        "data.eval.heldout_samples.size=16",
        "data.eval.heldout_combos.size=16",
        "train.steps=3",
    ]
    assert main(["train", "demo", *overrides, "--smoke", "--out", str(run), "--no-progress"]) == 0
    for name in ("recipe.yaml", "tokenizer.json", "metrics.jsonl", "results.json", "data_report.json"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").iterdir())
    assert main(["eval", str(run), "--out", str(tmp_path / "r.json")]) == 0
    test = read_results(tmp_path / "r.json").flat()["heldout_samples"]
    assert 0.0 <= test["zero_shot/image/shape/acc1"] <= 1.0
    assert "retrieval/image/image_retrieval_recall@5" in test
    assert test["samples"] == 16
    assert "zero_shot/image/color/acc1" in capsys.readouterr().out
