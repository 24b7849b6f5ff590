"""scikit-learn's digits as a source: a fixed stratified split, deterministic samples, captions that
name the digit, labels that are sklearn's, a well-formed zero-shot task, and a recipe that trains."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits as sklearn_load_digits

from coalign.config import load_recipe
from coalign.data.sources import digits as digits_module
from coalign.data.sources.digits import (
    DIGIT_NAMES,
    TEMPLATES,
    ZERO_SHOT_TEMPLATES,
    DigitsSource,
    split_indices,
    upscale,
)
from coalign.registry import SOURCES, ConfigError
from coalign.train.loop import train

SK = sklearn_load_digits()


def sample_original(sample: dict) -> int:
    """The index into sklearn's digits that a sample came from ("digits-123" -> 123)."""
    return int(sample["id"].removeprefix("digits-"))


def test_split_is_fixed_disjoint_complete_and_stratified():
    train_idx, test_idx = split_indices("train"), split_indices("test")
    assert set(train_idx).isdisjoint(test_idx)
    assert sorted([*train_idx, *test_idx]) == list(range(1797))
    # Brute force: a scan is a test scan iff it is the 5th, 10th, ... of its class in sklearn's order.
    seen = {d: 0 for d in range(10)}
    expected_test = []
    for i, d in enumerate(SK.target):
        seen[d] += 1
        if seen[d] % 5 == 0:
            expected_test.append(i)
    assert list(test_idx) == expected_test
    for d in range(10):
        n_test, n_all = int((SK.target[test_idx] == d).sum()), int((SK.target == d).sum())
        assert n_test == n_all // 5 and n_all - n_test > 0, f"digit {d} is in both splits, 80/20"
    # Pinned, so a change of scheme (or of sklearn's data) shows up here rather than in results.
    assert (len(train_idx), len(test_idx)) == (1442, 355)
    assert list(test_idx[:5]) == [33, 36, 37, 40, 44] and int(test_idx.sum()) == 322_086
    assert len(DigitsSource(split="test")) == 355 and len(DigitsSource(split="train")) == 1442


def test_sample_is_deterministic_and_only_captions_depend_on_seed():
    a, b = DigitsSource(split="train", captions=3), DigitsSource(split="train", captions=3)
    for i in (0, 7, 1441):
        sa, sb = a[i], b[i]
        assert sa["id"] == sb["id"] and sa["text"] == sb["text"] and sa["label"] == sb["label"]
        assert np.array_equal(sa["image"], sb["image"])
    other = DigitsSource(split="train", captions=3, seed=1)
    assert all(np.array_equal(a[i]["image"], other[i]["image"]) for i in range(20))
    assert any(a[i]["text"] != other[i]["text"] for i in range(20))
    with pytest.raises(IndexError, match="out of range"):
        a[1442]


def test_images_are_upscaled_scans_and_labels_are_sklearns():
    src = DigitsSource(split="test")
    for i in (0, 100, 354):
        s = src[i]
        k = sample_original(s)
        assert s["label"] == {"digit": int(SK.target[k])}
        img = s["image"]
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])
        # Each 4x4 block of the upscaled image averages back to (nearly) its scan pixel, 0..16 -> 0..255;
        # bicubic smoothing spreads ink into neighbouring blocks, hence the tolerance.
        blocks = img[..., 0].astype(float).reshape(8, 4, 8, 4).mean(axis=(1, 3))  # (8, 8)
        scan = SK.images[k] * 255 / 16
        assert np.corrcoef(blocks.ravel(), scan.ravel())[0, 1] > 0.97
        assert np.abs(blocks - scan).mean() < 20
    # At 8 px nothing is interpolated: exactly the scan, scaled to 0..255.
    exact = DigitsSource(split="test", image_size=8)[0]
    assert np.array_equal(exact["image"][..., 0], np.rint(SK.images[sample_original(exact)] * 255 / 16))
    assert upscale(SK.images[0], 48).shape == (48, 48, 3)


def test_captions_name_the_digit_and_vary():
    src = DigitsSource(split="train", captions=5)
    used = set()
    for i in range(0, 1442, 37):
        s = src[i]
        d = s["label"]["digit"]
        assert len(s["text"]) == 5 and len(set(s["text"])) == 5
        for text in s["text"]:
            words = text.replace(",", " ").split()
            assert DIGIT_NAMES[d] in words or str(d) in words, text
            others = [w for w in words if w in DIGIT_NAMES or w.isdigit()]
            assert others == [DIGIT_NAMES[d]] or others == [str(d)], f"one digit only: {text}"
            used.add(text.replace(DIGIT_NAMES[d], "{}").replace(str(d), "{}"))
    assert len(used) == len(TEMPLATES)  # every template is drawn
    assert isinstance(DigitsSource(split="test")[0]["text"], str)  # one caption is a plain string


def test_zero_shot_task_is_well_formed_and_unlike_training_captions():
    tasks = DigitsSource(split="test").zero_shot_tasks()
    assert list(tasks) == ["digit"]
    task = tasks["digit"]
    assert task.key == "digit" and task.classnames == DIGIT_NAMES and len(task.templates) >= 3
    train_captions = {t.format(word=w, numeral=str(d)) for t in TEMPLATES for d, w in enumerate(DIGIT_NAMES)}
    prompts = {t.format(c) for t in ZERO_SHOT_TEMPLATES for c in task.classnames}
    assert len(prompts) == len(ZERO_SHOT_TEMPLATES) * 10  # every template names the class
    assert prompts.isdisjoint(train_captions)


def test_bad_options_name_the_valid_ones():
    with pytest.raises(ValueError, match="valid splits: train, test"):
        DigitsSource(split="validation")
    with pytest.raises(ValueError, match="valid splits: train, test"):
        split_indices("heldout")
    with pytest.raises(ValueError, match="captions must be between 1 and 8"):
        DigitsSource(captions=9)
    with pytest.raises(ConfigError, match="valid splits: train, test"):
        SOURCES.validate("digits", {"split": "val"}, "data.train")
    with pytest.raises(ConfigError, match="data.train"):
        load_recipe("digits", ["data.train.split=val"])


def test_missing_sklearn_says_how_to_install_it(monkeypatch):
    digits_module.load_digits.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes `import sklearn.datasets` fail
    try:
        with pytest.raises(ImportError, match="pip install scikit-learn"):
            DigitsSource(split="train")
    finally:
        digits_module.load_digits.cache_clear()


def test_recipe_trains_with_smoke(tmp_path):
    recipe = load_recipe("digits", ["train.steps=3", "eval.max_samples=64"], smoke=True)
    assert recipe.data.train.options()["split"] == "train"
    assert {s.options()["split"] for s in recipe.data.eval.values()} == {"test"}
    result = train(recipe, tmp_path / "run", progress=False)
    assert result.step == 3
    (metrics,) = result.results.flat().values()
    assert metrics["samples"] == 64
    assert 0.0 <= metrics["zero_shot/image/digit/acc1"] <= 1.0
    assert "zero_shot/image/digit/mean_per_class_recall" in metrics
