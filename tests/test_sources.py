"""File-backed sources on small real datasets: contents, and that bad samples are skipped and counted."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coalign.data.loader import BatchDataset, eval_samples
from coalign.data.sources.base import SampleError, SkipCounter, Source
from coalign.data.sources.csv import CSVSource
from coalign.data.sources.folder import ImageFolderSource
from coalign.data.sources.jsonl import JSONLSource
from coalign.data.transforms.base import Pipeline
from coalign.data.transforms.image import ImageTransform
from coalign.data.transforms.text import BPETextTransform
from coalign.registry import SOURCES, ConfigError

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 70, 230)}


def write_png(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 24, 3), color, dtype=np.uint8)).save(path)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """imgs/{red,green,blue}.png are good; imgs/bad.png is garbage bytes; imgs/gone.png does not exist."""
    for name, color in COLORS.items():
        write_png(tmp_path / "imgs" / f"{name}.png", color)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"this is not a png \x00\x01\x02" * 8)
    return tmp_path


# (image, caption, label): 3 good rows, then one corrupt image, one missing file, one empty caption.
ROWS = [
    ("imgs/red.png", "a red square", 0),
    ("imgs/green.png", "a green square", 1),
    ("BLUE_ABS", "a blue square", 2),
    ("imgs/bad.png", "a broken picture", 0),
    ("imgs/gone.png", "a picture that is not there", 1),
    ("imgs/red.png", "", 0),
]
EXPECTED_SKIPS = {"corrupt_image": 1, "missing_image": 1, "empty_caption": 1}


def rows(root: Path) -> list[tuple[str, str, int]]:
    blue = str(root / "imgs" / "blue.png")  # an absolute path stays as it is
    return [(blue if img == "BLUE_ABS" else img, cap, lab) for img, cap, lab in ROWS]


def pipeline_for(source: Source) -> Pipeline:
    text = BPETextTransform(context_length=8, vocab_size=300)
    text.fit(source, None)
    return Pipeline({"image": ImageTransform(size=16), "text": text})


def check_skipping(source: Source, good_ids: set[str], expected: dict[str, int]) -> None:
    """One batch over the whole source holds exactly the good samples; the rest are counted by reason."""
    pipeline = pipeline_for(source)
    batch = BatchDataset(source, pipeline, batch_size=len(source), seed=0)[0]
    assert set(batch["id"]) == good_ids and len(batch["id"]) == len(good_ids)
    assert batch["image"].shape == (len(good_ids), 3, 16, 16)
    assert batch["text"].shape == (len(good_ids), 8)
    assert dict(batch["skipped"]) == expected
    skipped = SkipCounter()
    kept = [source[i]["id"] for i, _ in eval_samples(source, pipeline, None, skipped)]
    assert set(kept) == good_ids
    assert dict(skipped) == expected


# ----------------------------------------------------------------------------------------------- csv


def write_csv(path: Path, header: list[str], body: list[list[str]], sep: str = ",") -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(header)
        w.writerows(body)
    return path


def test_csv_contents_and_skips(images: Path) -> None:
    path = write_csv(
        images / "train.csv", ["filepath", "title", "cls"], [[i, c, str(lab)] for i, c, lab in rows(images)]
    )
    src = SOURCES.create("csv", path=str(path), label_keys=["cls"])
    assert isinstance(src, CSVSource) and len(src) == len(ROWS)
    first = src[0]
    assert first == {
        "id": "0",
        "image": str((images / "imgs" / "red.png").absolute()),
        "text": "a red square",
        "label": {"cls": 0},
    }
    assert src[2]["image"] == str(images / "imgs" / "blue.png")
    assert src[5]["text"] == ""
    assert src[3]["image"].endswith("bad.png")  # the source does not open images
    check_skipping(src, {"0", "1", "2"}, EXPECTED_SKIPS)


def test_tsv_custom_keys_root_and_ids(images: Path) -> None:
    kept = [(img, cap) for img, cap, _ in ROWS if img != "BLUE_ABS"]
    body = [[f"s{n}", img, cap] for n, (img, cap) in enumerate(kept)]
    (images / "meta").mkdir()  # the manifest is not beside the images, so `root` says where they are
    path = write_csv(images / "meta" / "m.tsv", ["id", "path", "caption"], body, sep="\t")
    src = CSVSource(path=str(path), image_key="path", caption_key="caption", root=str(images))
    assert len(src) == 5
    assert src[0]["id"] == "s0" and src[0]["image"] == str((images / "imgs" / "red.png").absolute())
    assert src[0]["label"] == {}
    check_skipping(src, {"s0", "s1"}, EXPECTED_SKIPS)


def test_csv_bad_column_names_missing_and_available(images: Path) -> None:
    path = write_csv(images / "x.csv", ["filepath", "caption"], [["imgs/red.png", "red"]])
    with pytest.raises(ConfigError) as err:
        CSVSource(path=str(path))  # default caption_key is "title"
    msg = str(err.value)
    assert "'title'" in msg and "caption_key" in msg and "filepath, caption" in msg
    with pytest.raises(ConfigError, match="'cls'"):
        CSVSource(path=str(path), caption_key="caption", label_keys=["cls"])
    with pytest.raises(ConfigError, match="does not exist"):
        CSVSource(path=str(images / "nope.csv"))


def test_csv_bad_label_is_a_sample_error(images: Path) -> None:
    path = write_csv(images / "l.csv", ["filepath", "title", "y"], [["imgs/red.png", "red", "x"]])
    with pytest.raises(SampleError) as err:
        CSVSource(path=str(path), label_keys=["y"])[0]
    assert err.value.reason == "bad_label"


# --------------------------------------------------------------------------------------------- jsonl


def test_jsonl_captions_lists_and_malformed_lines(images: Path) -> None:
    lines = []
    for n, (img, cap, lab) in enumerate(rows(images)):
        caption = [cap, f"{cap} again"] if n == 0 else (cap or [])
        lines.append(json.dumps({"image": img, "caption": caption, "y": lab}))
    lines.insert(2, '{"image": "imgs/red.png", "caption": ')  # malformed: truncated
    lines.insert(4, "   ")  # blank lines are not samples
    path = images / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    src = SOURCES.create("jsonl", path=str(path), label_keys=["y"])
    assert isinstance(src, JSONLSource) and len(src) == len(ROWS) + 1
    assert src[0]["text"] == ["a red square", "a red square again"]
    assert src[0]["label"] == {"y": 0} and src[0]["image"].endswith("red.png")
    with pytest.raises(SampleError) as err:
        src[2]
    assert err.value.reason == "corrupt_record" and "line 3" in err.value.detail
    assert "a red square" in src.captions()
    check_skipping(src, {"0", "1", "3"}, EXPECTED_SKIPS | {"corrupt_record": 1})


def test_jsonl_bad_key_lists_available(images: Path) -> None:
    path = images / "k.jsonl"
    path.write_text(json.dumps({"img": "imgs/red.png", "caption": "red"}) + "\n")
    with pytest.raises(ConfigError) as err:
        JSONLSource(path=str(path))
    assert "'image'" in str(err.value) and "caption, img" in str(err.value)


# -------------------------------------------------------------------------------------------- folder


def test_image_folder_captions_and_skips(images: Path) -> None:
    folder = images / "imgs"
    for name in COLORS:
        (folder / f"{name}.txt").write_text(f"a {name} square\n")
    (folder / "bad.txt").write_text("a broken picture")
    write_png(folder / "sub" / "nocaption.PNG", (9, 9, 9))  # no .txt beside it
    (folder / "notes.md").write_text("not an image")
    src = SOURCES.create("image_folder", path=str(folder))
    assert isinstance(src, ImageFolderSource)
    assert [src[i]["id"] for i in range(len(src))] == [
        "bad.png", "blue.png", "green.png", "red.png", "sub/nocaption.PNG"
    ]  # fmt: skip
    assert src[1] == {
        "id": "blue.png",
        "image": str(folder / "blue.png"),
        "text": "a blue square",
        "label": {},
    }
    assert src[4]["text"] == ""
    check_skipping(src, {"blue.png", "green.png", "red.png"}, {"corrupt_image": 1, "empty_caption": 1})


def test_image_folder_class_labels(tmp_path: Path) -> None:
    for cls, n in [("dogs", 2), ("cats", 1)]:
        for i in range(n):
            write_png(tmp_path / cls / f"{i}.jpg", (i * 50, 0, 0))
            (tmp_path / cls / f"{i}.txt").write_text(f"a {cls[:-1]}")
    src = ImageFolderSource(path=str(tmp_path), labels_from_folders=True, extensions=["jpg"])
    assert [(src[i]["id"], src[i]["label"]) for i in range(len(src))] == [
        ("cats/0.jpg", {"class": 0}), ("dogs/0.jpg", {"class": 1}), ("dogs/1.jpg", {"class": 1})
    ]  # fmt: skip
    assert src.zero_shot_tasks()["class"].classnames == ["cats", "dogs"]
    write_png(tmp_path / "loose.jpg", (0, 0, 0))
    with pytest.raises(ConfigError, match="class subfolder"):
        ImageFolderSource(path=str(tmp_path), labels_from_folders=True)
    with pytest.raises(ConfigError, match="no images"):
        ImageFolderSource(path=str(tmp_path), extensions=[".tiff"])
