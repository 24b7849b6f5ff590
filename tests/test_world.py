"""The built-in world: deterministic, compositional split, varied captions."""

import numpy as np

from coalign.data.world import ATTRIBUTES, HELDOUT_PAIRS, WorldSource, caption, combinations


def test_deterministic_and_split_dependent():
    a, b = WorldSource(split="train", size=10), WorldSource(split="train", size=10, cache=False)
    for i in range(5):
        assert np.array_equal(a[i]["image"], b[i]["image"]) and a[i]["text"] == b[i]["text"]
    test = WorldSource(split="test", size=10)
    assert not np.array_equal(a[0]["image"], test[0]["image"])
    assert a[0]["image"].shape == (64, 64, 3) and a[0]["image"].dtype == np.uint8
    assert WorldSource(image_size=32, size=1)[0]["image"].shape == (32, 32, 3)


def test_heldout_pairs_never_in_train_or_test():
    names = {k: v for k, v in ATTRIBUTES.items()}
    for split in ("train", "test"):
        src = WorldSource(split=split, size=400)
        for i in range(len(src)):
            lab = src[i]["label"]
            assert (names["shape"][lab["shape"]], names["color"][lab["color"]]) not in HELDOUT_PAIRS
    held = WorldSource(split="heldout", size=100)
    for i in range(len(held)):
        lab = held[i]["label"]
        assert (names["shape"][lab["shape"]], names["color"][lab["color"]]) in HELDOUT_PAIRS
    # Every shape and every colour still occurs in training, just not in the held-out pairings.
    combos = combinations("train")
    assert {c.shape for c in combos} == set(ATTRIBUTES["shape"])
    assert {c.color for c in combos} == set(ATTRIBUTES["color"])


def test_captions_mention_attributes_in_varied_order():
    src = WorldSource(split="test", size=200, captions=3, partial_caption_prob=0.0)
    first_words, orders = set(), set()
    for i in range(len(src)):
        s = src[i]
        attrs = {k: ATTRIBUTES[k][v] for k, v in s["label"].items()}
        for text in s["text"]:
            assert attrs["shape"] in text and attrs["color"] in text
            first_words.add(text.split()[0])
            orders.add(text.index(attrs["color"]) < text.index(attrs["shape"]))
    assert len(first_words) >= 4  # several sentence structures
    assert orders == {True, False}  # colour both before and after the shape


def test_partial_captions_leave_attributes_out():
    rng = np.random.default_rng(0)
    attrs = combinations("train")[0]
    texts = [caption(attrs, rng, partial_prob=1.0) for _ in range(50)]
    assert any(attrs.color not in t for t in texts) and any(attrs.shape not in t for t in texts)
    assert all(t.strip() for t in texts)


def test_zero_shot_tasks_cover_every_attribute():
    tasks = WorldSource(size=1).zero_shot_tasks()
    assert set(tasks) == set(ATTRIBUTES)
    assert tasks["color"].classnames == ATTRIBUTES["color"]
