"""`coalign data filter` (issue #15, point 5): each rule removes what it names and is counted under
it, unreadable inputs are skipped and counted, duplicates are found (exact by pixels, near by a
FAISS range search, checked against brute force), and the CLIP score is the model's own cosine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from coalign.build import load_run
from coalign.cli import main
from coalign.data.filter import near_duplicates
from coalign.data.filter_rules import Rules, caption_rule, image_rule
from coalign.data.sources.webdataset import WebDatasetSource
from coalign.registry import SOURCES


def test_caption_and_image_rules():
    r = Rules(max_words=5, max_repeat=0.5, min_letters=0.5, script="latin", min_image_side=8, max_aspect=3)
    assert caption_rule("a red square", r) is None
    assert caption_rule("   ", r) == "caption_too_short"
    assert caption_rule("one two three four five six", r) == "caption_too_long"
    assert caption_rule("buy buy buy buy shoes", r) == "repeated_words"  # 3 of 5 words repeat
    assert caption_rule("buy buy shoes now", r) is None  # 1 of 4
    assert caption_rule("x 12345 67890", r) == "few_letters"
    assert caption_rule("красный квадрат", r) == "wrong_script"
    assert caption_rule("красный квадрат", Rules(script="cyrillic")) is None
    assert caption_rule("a café", r) is None  # accented Latin letters are Latin
    assert image_rule(16, 16, r) is None and image_rule(7, 16, r) == "image_too_small"
    assert image_rule(48, 16, r) is None and image_rule(49, 16, r) == "extreme_aspect"
    with pytest.raises(ValueError, match="need --model"):
        Rules(keep_fraction=0.5).check(has_model=False)
    with pytest.raises(ValueError, match=r"--keep-fraction must be in \(0, 1\]"):
        Rules(keep_fraction=1.5).check(has_model=True)


def _greedy(x: np.ndarray, order: np.ndarray, t: float) -> dict[int, int]:
    """The brute-force reference: visit rows in order; a row is removed when a kept one is >= t."""
    kept: list[int] = []
    out = {}
    for i in order:
        sims = [float(x[i] @ x[k]) for k in kept]
        hit = next((k for k, s in zip(kept, sims, strict=True) if s >= t - 1e-6), None)
        if hit is None:
            kept.append(int(i))
        else:
            out[int(i)] = hit
    return out


def test_near_duplicates_match_brute_force():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16))
    x = np.concatenate([c + 0.15 * rng.normal(size=(8, 16)) for c in centres]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    order = rng.permutation(len(x))
    for t in (0.9, 0.97, 0.995):
        found = near_duplicates(x, order, t, chunk=7)  # chunks smaller than the set
        want = _greedy(x, order, t)
        assert set(found) == set(want)
        for i, k in found.items():  # each removed row duplicates a row that is kept
            assert x[i] @ x[k] >= t - 1e-6 and k not in found
    assert 0 < len(near_duplicates(x, order, 0.97)) < len(x)


@pytest.fixture
def messy_csv(tmp_path) -> Path:
    """Rows 0-3 good; then one row for each rule (and a row each for two unreadable reasons)."""
    rng = np.random.default_rng(1)

    def image(name, h, w):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)

    for i in range(4):
        image(f"g{i}.png", 16, 16)
    shutil.copy(tmp_path / "g0.png", tmp_path / "copy.png")  # another file, the same pixels
    image("small.png", 6, 16)
    image("wide.png", 8, 40)
    for i in range(3):
        image(f"b{i}.png", 16, 16)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    rows = [
        "filepath,title",
        "g0.png,a red square",  # 0
        "g1.png,a blue circle",  # 1
        "g2.png,a green cross at the top",  # 2
        "g3.png,image",  # 3: 'image' twice is allowed (--max-caption-count 2)
        "bad.png,a corrupt file",  # 4: unreadable
        "g1.png,",  # 5: unreadable (no caption)
        "g2.png," + " ".join(f"w{i}" for i in range(20)),  # 6: caption_too_long
        "g3.png,buy buy buy buy shoes",  # 7: repeated_words
        "g0.png,## 1234 5678 ##",  # 8: few_letters
        "g1.png,красный квадрат",  # 9: wrong_script
        "b0.png,a photo",  # 10-12: the same caption three times: repeated_caption
        "b1.png,a photo",
        "b2.png,a photo",
        "small.png,a small one",  # 13: image_too_small
        "wide.png,a wide one",  # 14: extreme_aspect
        "copy.png,a copy of the red square",  # 15: exact_duplicate of 0
        "b0.png,image",  # 16: image (second time): kept
    ]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "m.csv"


RULE_ARGS = ["--max-words", "12", "--max-repeat", "0.5", "--min-letters", "0.5", "--script", "latin"]
RULE_ARGS += ["--max-caption-count", "2", "--min-image-side", "8", "--max-aspect", "3", "--shard-size", "2"]


def test_rules_remove_and_count_each_sample_once(messy_csv, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["data", "filter", str(messy_csv), str(out), *RULE_ARGS, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert (
        "kept 5 of 17 samples" in printed
        and "2 unreadable (1 corrupt_image, 1 empty_caption)" in " ".join(printed.split())
    )
    report = json.loads((out / "filter_report.json").read_text())
    assert report["removed"] == {
        "unreadable": 2,
        "caption_too_long": 1,
        "repeated_words": 1,
        "few_letters": 1,
        "wrong_script": 1,
        "repeated_caption": 3,
        "image_too_small": 1,
        "extreme_aspect": 1,
        "exact_duplicate": 1,
    }
    assert report["unreadable"] == {"corrupt_image": 1, "empty_caption": 1}
    assert report["kept"] == report["packed"] == 5 and "score" not in report
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    assert [r["index"] for r in removed] == list(range(4, 16))
    assert removed[-1] == {"index": 15, "rule": "exact_duplicate", "score": None, "duplicate_of": 0}
    assert removed[0]["reason"] == "corrupt_image"
    shards = WebDatasetSource(path=str(out), shuffle=False)
    assert len(shards) == 5 and len(shards.paths) == 3
    assert [shards.members(i)[0] for i in range(5)] == ["000000", "000001", "000002", "000003", "000016"]
    assert [shards[i]["text"] for i in range(5)] == [
        "a red square",
        "a blue circle",
        "a green cross at the top",
        "image",
        "image",
    ]
    assert shards[0]["image"] == (messy_csv.parent / "g0.png").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["filter"]["kept"] == 5
    # Filtering the filtered shards again with the same rules removes nothing.
    assert main(["data", "filter", str(out), str(tmp_path / "again"), *RULE_ARGS, "--no-progress"]) == 0
    assert json.loads((tmp_path / "again" / "filter_report.json").read_text())["removed"] == {}


def test_bad_options_fail_before_any_work(messy_csv, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["data", "filter", str(messy_csv), str(out), "--keep-fraction", "0.5"]) == 2
    assert "--keep-fraction need --model RUN" in capsys.readouterr().err
    assert main(["data", "filter", str(messy_csv), str(out), "--max-aspect", "0.5"]) == 2
    assert "--max-aspect" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main(["data", "filter", str(messy_csv), str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep me"


def test_scores_are_the_models_cosines(tiny_run, tmp_path):
    """With a model: the score of each pair is its image . caption cosine (computed here from
    `load_run` and `encode` directly), the best half is kept, and no two kept images are near
    duplicates."""
    run = load_run(tiny_run)
    src = SOURCES.create("world", split="test", size=40)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        a = run.model.encode(
            "image", torch.stack([run.transforms["image"](src[i]["image"], rng) for i in range(40)])
        )
        b = run.model.encode(
            "text", torch.stack([run.transforms["text"](src[i]["text"], rng) for i in range(40)])
        )
    cos, sims = (a * b).sum(1).numpy(), (a @ a.T).numpy()
    # A barely trained model maps images close together: the cut is taken from its own similarities.
    t = float(np.quantile(sims[np.triu_indices(40, 1)], 0.97))
    out = tmp_path / "out"
    spec = "{source: world, split: test, size: 40}"
    args = ["--model", str(tiny_run), "--keep-fraction", "0.5", "--near-duplicates", f"{t:.6f}"]
    assert main(["data", "filter", spec, str(out), *args, "--batch-size", "16", "--no-progress"]) == 0
    removed = {r["index"]: r for r in map(json.loads, (out / "removed.jsonl").read_text().splitlines())}
    shards = WebDatasetSource(path=str(out), shuffle=False)
    kept = [int(shards.members(i)[0]) for i in range(len(shards))]
    report = json.loads((out / "filter_report.json").read_text())
    dups = {i: r["duplicate_of"] for i, r in removed.items() if r["rule"] == "near_duplicate"}
    low = [i for i, r in removed.items() if r["rule"] == "low_score"]
    assert set(removed) | set(kept) == set(range(40)) and len(kept) == (40 - len(dups)) // 2
    assert 0 < len(dups) < 20 and low
    for i, r in removed.items():
        np.testing.assert_allclose(r["score"], cos[i], atol=1e-4)
    for i, k in dups.items():
        assert sims[i, k] >= t - 1e-4
        assert k not in removed or removed[k]["rule"] == "low_score"  # the copy kept by the rule
    assert min(cos[kept]) >= max(cos[low]) - 1e-6
    for x in kept:
        for y in kept:
            assert x == y or sims[x, y] < t + 1e-4
    assert sum(report["score"]["histogram"]["counts"]) == report["score"]["scored"] == 40 - len(dups)
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
