"""The formats users have (COCO captions, Karpathy splits, local Hugging Face datasets) and zero-shot for
any labelled source (class names and templates, string labels): small files in each layout, written here."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported: nothing may go online
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from coalign.cli import main  # noqa: E402
from coalign.data.sources.base import SampleError  # noqa: E402
from coalign.evaluate.suites import load_suite  # noqa: E402
from coalign.registry import SOURCES, ConfigError  # noqa: E402
from test_sources import COLORS, check_skipping, write_png  # noqa: E402

datasets = pytest.importorskip("datasets")


def write_images(root: Path, names: list[str]) -> None:
    """root/<name> as a small PNG, colours cycling red, green, blue."""
    for i, name in enumerate(names):
        write_png(root / name, list(COLORS.values())[i % 3])


def five(text: str) -> list[str]:
    return [f"{text}, caption {k}" for k in range(5)]


# ---------------------------------------------------------------------------------------------- coco


def write_coco(root: Path) -> Path:
    """COCO's layout: root/annotations/captions_val2017.json, images in root/val2017/. Image 3's file is
    missing, image 4 has no caption, and one caption belongs to an image the file does not list."""
    write_images(root / "val2017", ["a.jpg", "b.jpg", "c.jpg", "e.jpg"])
    images = [{"id": i, "file_name": f, "height": 20, "width": 24} for i, f in [(2, "b.jpg"), (1, "a.jpg")]]
    images += [
        {"id": 3, "file_name": "gone.jpg"},
        {"id": 4, "file_name": "e.jpg"},
        {"id": 5, "file_name": "c.jpg"},
    ]
    texts = {1: five("a red square"), 2: five("a green square"), 3: ["lost"], 5: five("a blue square")}
    annotations = [
        {"id": 10 * i + k, "image_id": i, "caption": c}
        for i, caps in texts.items()
        for k, c in enumerate(caps)
    ]
    annotations.append({"id": 999, "image_id": 77, "caption": "an image nobody listed"})
    path = root / "annotations" / "captions_val2017.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return path


def test_coco_one_sample_per_image_with_all_captions(tmp_path: Path) -> None:
    src = SOURCES.create("coco", path=str(write_coco(tmp_path)))
    assert [src[i]["id"] for i in range(len(src))] == ["1", "2", "3", "4", "5"]  # by image id
    first = src[0]
    assert first["text"] == five("a red square")
    assert first["image"] == str(tmp_path / "val2017" / "a.jpg")  # found by COCO's layout
    assert src[3]["text"] == []
    check_skipping(src, {"1", "2", "5"}, {"missing_image": 1, "empty_caption": 1})


def test_coco_image_root_and_bad_files(tmp_path: Path) -> None:
    path = write_coco(tmp_path / "coco")
    shutil.move(tmp_path / "coco" / "val2017", tmp_path / "elsewhere")
    src = SOURCES.create("coco", path=str(path), image_root=str(tmp_path / "elsewhere"))
    assert src[0]["image"] == str(tmp_path / "elsewhere" / "a.jpg")
    assert SOURCES.create("coco", path=str(path))[0]["image"] == str(
        path.parent / "a.jpg"
    )  # the JSON's folder

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not a JSON file"):
        SOURCES.create("coco", path=str(bad))
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"bbox": [0]}]}))
    with pytest.raises(ConfigError, match="no 'caption' \\(an instances file\\?\\)"):
        SOURCES.create("coco", path=str(bad))
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="'images' and 'annotations'"):
        SOURCES.create("coco", path=str(bad))


# ------------------------------------------------------------------------------------------ karpathy


def karpathy_record(i: int, split: str, folder: str | None) -> dict:
    record = {
        "filename": f"img{i}.jpg",
        "imgid": i,
        "split": split,
        "sentids": list(range(5 * i, 5 * i + 5)),
        "sentences": [
            {"raw": c, "tokens": c.lower().split(), "imgid": i, "sentid": 5 * i + k}
            for k, c in enumerate(five(f"Photo {i}"))
        ],
    }
    if folder is not None:
        record |= {"filepath": folder, "cocoid": 1000 + i}
    return record


def write_karpathy(root: Path, dataset: str, splits: list[str]) -> Path:
    """dataset_<dataset>.json with one image per entry of `splits`; COCO's records carry a filepath."""
    folder = "val2014" if dataset == "coco" else None
    records = [karpathy_record(i, split, folder) for i, split in enumerate(splits)]
    write_images(root / (folder or ""), [f"img{i}.jpg" for i in range(len(splits))])
    path = root / f"dataset_{dataset}.json"
    path.write_text(json.dumps({"images": records, "dataset": dataset}))
    return path


def test_karpathy_coco_splits(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path, "coco", ["train", "restval", "val", "test", "test", "restval"])
    test = SOURCES.create("karpathy", path=str(path), split="test")
    assert [test[i]["id"] for i in range(len(test))] == ["val2014/img3.jpg", "val2014/img4.jpg"]
    assert test[0]["image"] == str(tmp_path / "val2014" / "img3.jpg")
    assert test[0]["text"] == five("Photo 3")  # the raw sentences, all five
    train = SOURCES.create("karpathy", path=str(path), split="train+restval")
    assert len(train) == 3 and len(SOURCES.create("karpathy", path=str(path))) == 1  # default: train
    with pytest.raises(ConfigError, match="'tset' is not a Karpathy split \\(did you mean 'test'\\?\\)"):
        SOURCES.create("karpathy", path=str(path), split="train+tset")


def test_karpathy_flickr_and_missing_images(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path, "flickr30k", ["train", "test", "test", "test"])
    data = json.loads(path.read_text())
    data["images"][2]["sentences"] = [{"tokens": ["only", "tokens"]}]  # no raw: the tokens joined
    data["images"][3]["filename"] = "gone.jpg"
    path.write_text(json.dumps(data))
    src = SOURCES.create("karpathy", path=str(path), split="test", image_root=str(tmp_path))
    assert src[0]["image"] == str(tmp_path / "img1.jpg") and src[0]["id"] == "img1.jpg"
    assert src[1]["text"] == ["only tokens"]
    check_skipping(src, {"img1.jpg", "img2.jpg"}, {"missing_image": 1})
    with pytest.raises(ConfigError, match=r"no images in split 'restval'; it has: test \(3\), train \(1\)"):
        SOURCES.create("karpathy", path=str(path), split="restval")


# ------------------------------------------------------------------------------------ hugging face


def png_bytes(colour: tuple[int, int, int]) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((12, 12, 3), colour, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def image_dataset(labels: list, label_feature=None):
    """Rows with an Image feature (bytes), a list of captions and `labels`; row 1's image is corrupt."""
    colours = list(COLORS.values())
    images = [{"bytes": png_bytes(colours[i % 3]), "path": None} for i in range(len(labels))]
    images[1] = {"bytes": b"not an image at all", "path": None}
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "captions": datasets.Sequence(datasets.Value("string")),
            "name": datasets.Value("string"),
            "y": label_feature or datasets.Value("string"),
        }
    )
    data = {
        "img": images,
        "captions": [[f"square {i}", f"thing {i}"] for i in range(len(labels))],
        "name": [f"row-{i}" for i in range(len(labels))],
        "y": labels,
    }
    return datasets.Dataset.from_dict(data, features=features)


def test_hf_save_to_disk_with_class_label(tmp_path: Path) -> None:
    feature = datasets.ClassLabel(names=["red", "green", "blue"])
    image_dataset([0, 1, 2, -1], feature).save_to_disk(str(tmp_path / "ds"))
    opts = dict(path=str(tmp_path / "ds"), image_column="img", caption_column="captions", label_column="y")
    src = SOURCES.create("hf", **opts, id_column="name")
    assert len(src) == 4
    first = src[0]
    assert first["id"] == "row-0" and first["text"] == ["square 0", "thing 0"]
    assert isinstance(first["image"], bytes) and first["label"] == {"y": 0}
    assert src.zero_shot_tasks()["y"].classnames == ["red", "green", "blue"]  # from the ClassLabel
    with pytest.raises(SampleError, match="label 'y' is None"):  # ClassLabel's -1: no label
        src[3]
    check_skipping(src, {"row-0", "row-2"}, {"corrupt_image": 1, "bad_label": 1})
    overridden = SOURCES.create("hf", **opts, classnames=["crimson", "lime", "navy"])
    assert overridden.zero_shot_tasks()["y"].classnames == ["crimson", "lime", "navy"]
    with pytest.raises(
        ConfigError,
        match=r"caption_column 'caption' not found \(did you mean 'captions'\?\); available: img, capt",
    ):
        SOURCES.create("hf", path=str(tmp_path / "ds"), image_column="img")


def test_hf_dataset_dict_splits(tmp_path: Path) -> None:
    ds = image_dataset(["red", "blue"])
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    opts = dict(path=str(tmp_path / "dd"), image_column="img", caption_column="captions")
    assert len(SOURCES.create("hf", **opts, split="test")) == 1
    with pytest.raises(ConfigError, match="pick one with split; splits: train, test"):
        SOURCES.create("hf", **opts)
    with pytest.raises(ConfigError, match="no split 'tset' \\(did you mean 'test'\\?\\)"):
        SOURCES.create("hf", **opts, split="tset")


def test_hf_parquet_with_string_labels_and_arrow(tmp_path: Path) -> None:
    ds = image_dataset(["red", "green", "blue", "red"])
    (tmp_path / "pq").mkdir()
    ds.select([0, 1]).to_parquet(str(tmp_path / "pq" / "test-00000-of-00002.parquet"))
    ds.select([2, 3]).to_parquet(str(tmp_path / "pq" / "test-00001-of-00002.parquet"))
    opts = dict(
        image_column="img", caption_column="captions", label_column="y", cache_dir=str(tmp_path / "c")
    )
    names = ["red", "green", "blue"]
    src = SOURCES.create("hf", path=str(tmp_path / "pq"), **opts, classnames=names)
    assert len(src) == 4 and [src[i]["label"]["y"] for i in (0, 2, 3)] == [0, 2, 0]
    glob = SOURCES.create("hf", path=str(tmp_path / "pq" / "test-*.parquet"), **opts, classnames=names)
    assert len(glob) == 4
    with pytest.raises(ConfigError, match="row 2: label 'blue' .* valid: 'red', 'green'"):
        SOURCES.create("hf", path=str(tmp_path / "pq"), **opts, classnames=["red", "green"])
    with pytest.raises(ConfigError, match="split picks a split of a save_to_disk DatasetDict"):
        SOURCES.create("hf", path=str(tmp_path / "pq"), **opts, classnames=names, split="test")

    ds.save_to_disk(str(tmp_path / "saved"))  # its .arrow files, read where they lie
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    del opts["cache_dir"]
    assert len(SOURCES.create("hf", path=str(arrow), **opts, classnames=names)) == 4


def test_hf_image_paths_resolve_against_image_root(tmp_path: Path) -> None:
    write_images(tmp_path / "pics", ["a.png", "b.png"])
    data = {"file": ["a.png", "b.png", "gone.png"], "text": ["one", "two", "three"]}
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "paths"))
    opts = dict(path=str(tmp_path / "paths"), image_column="file", caption_column="text")
    src = SOURCES.create("hf", **opts, image_root=str(tmp_path / "pics"))
    assert src[0]["image"] == str(tmp_path / "pics" / "a.png")
    check_skipping(src, {"0", "1"}, {"missing_image": 1})
    with pytest.raises(ConfigError, match="path '.*nowhere' does not exist"):
        SOURCES.create("hf", path=str(tmp_path / "nowhere"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="'.*notes.txt' is neither a save_to_disk folder .* nor parquet"):
        SOURCES.create("hf", path=str(tmp_path / "notes.txt"))
    with pytest.raises(ConfigError, match="format: 'parqet' is not a format \\(did you mean 'parquet'\\?\\)"):
        SOURCES.create("hf", **opts, format="parqet")


# -------------------------------------------------------------------- zero-shot on labelled manifests


def write_manifest(root: Path, labels: list[str], name: str = "m.csv") -> Path:
    write_images(root, [f"{i}.png" for i in range(len(labels))])
    with open(root / name, "w", newline="") as f:
        csv.writer(f).writerows(
            [("filepath", "title", "label"), *[(f"{i}.png", f"x {i}", y) for i, y in enumerate(labels)]]
        )
    return root / name


def clip_benchmark_files(root: Path) -> tuple[Path, Path]:
    """classnames / templates JSON in CLIP_benchmark's layout: {dataset: [...]}, templates with {c}."""
    (root / "classnames.json").write_text(
        json.dumps({"colours": ["red", "green", "blue"], "cifar10": ["cat"]})
    )
    templates = {"colours": ["a photo of a {c}.", "a {c} square."], "cifar10": ["a {c}."]}
    (root / "templates.json").write_text(json.dumps(templates))
    return root / "classnames.json", root / "templates.json"


def test_csv_string_labels_with_clip_benchmark_classnames(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, ["green", "red", " blue ", "2", ""])
    names, templates = clip_benchmark_files(tmp_path)
    opts = dict(path=str(path), label_keys=["label"], classnames=str(names), dataset_name="colours")
    src = SOURCES.create("csv", **opts, templates=str(templates))
    assert [src[i]["label"]["label"] for i in range(4)] == [1, 0, 2, 2]  # names, stripped, or an index
    task = src.zero_shot_tasks()["label"]
    assert task.classnames == ["red", "green", "blue"]
    assert task.templates == ["a photo of a {}.", "a {} square."]  # CLIP_benchmark's {c}, one spelling
    with pytest.raises(SampleError, match="bad_label"):  # a blank label is missing data: a counted skip
        src[4]
    assert SOURCES.create("csv", **opts).zero_shot_tasks()["label"].templates[0] == "a photo of a {}."


def test_unknown_label_is_one_line_naming_it_and_the_valid_ones(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, ["red", "zebra", "grene", "7"])
    with pytest.raises(ConfigError) as err:
        SOURCES.create("csv", path=str(path), label_keys=["label"], classnames=["red", "green", "blue"])
    message = str(err.value)
    assert "\n" not in message
    assert "row 1: label 'zebra' (key 'label') is not one of the 3 classnames" in message
    assert "(3 unknown values in all)" in message  # zebra, grene and the index 7
    assert "valid: 'red', 'green', 'blue' (or an index 0..2)" in message


def test_jsonl_integer_labels_and_classnames_per_key(tmp_path: Path) -> None:
    write_images(tmp_path, ["a.png", "b.png"])
    lines = [
        {"image": "a.png", "caption": "a", "colour": 2, "size": "big"},
        {"image": "b.png", "caption": "b", "colour": "red", "size": 0},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    names, _ = clip_benchmark_files(tmp_path)
    opts = dict(path=str(tmp_path / "m.jsonl"), label_keys=["colour", "size"])
    src = SOURCES.create(
        "jsonl", **opts, classnames={"colour": str(names), "size": ["small", "big"]}, dataset_name="colours"
    )
    assert src[0]["label"] == {"colour": 2, "size": 1} and src[1]["label"] == {"colour": 0, "size": 0}
    assert set(src.zero_shot_tasks()) == {"colour", "size"}
    assert set(SOURCES.create("jsonl", **opts, classnames={"size": ["small", "big"]}).zero_shot_tasks()) == {
        "size"
    }
    with pytest.raises(
        ConfigError, match="classnames as one list needs exactly one label key, this source has 2"
    ):
        SOURCES.create("jsonl", **opts, classnames=["small", "big"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"classnames": "CN"}, "holds several datasets; pick one with dataset_name: cifar10, colours"),
        (
            {"classnames": "CN", "dataset_name": "colors"},
            "no dataset 'colors' \\(did you mean 'colours'\\?\\)",
        ),
        ({"classnames": "missing.json"}, "classnames 'label' file 'missing.json' does not exist"),
        (
            {"classnames": ["a"], "templates": ["no placeholder"]},
            "templates: template 'no placeholder' has no",
        ),
        ({"templates": ["a {c}"]}, "templates are given but no classnames"),
        ({"classnames": ["a"], "dataset_name": "colours"}, "dataset_name picks .*; neither is a file"),
        ({"classnames": {"lable": ["a"]}}, "'lable' is not a label key \\(did you mean 'label'\\?\\)"),
        ({"classnames": []}, "must be a non-empty list"),
    ],
)
def test_zero_shot_option_errors(tmp_path: Path, options: dict, message: str) -> None:
    path = write_manifest(tmp_path, ["red"])
    names, _ = clip_benchmark_files(tmp_path)
    options = {k: str(names) if v == "CN" else v for k, v in options.items()}
    with pytest.raises(ConfigError, match=message):
        SOURCES.create("csv", path=str(path), label_keys=["label"], **options)


# ------------------------------------------------------------------------------ suites, end to end


@pytest.mark.slow
def test_suite_evaluates_karpathy_retrieval_and_csv_zero_shot(tmp_path: Path, tiny_run: Path) -> None:
    """`coalign eval --suite` on a Karpathy test split (every one of 5 captions per image) and on a CSV
    with string labels named by a CLIP_benchmark classnames file."""
    shutil.copytree(tiny_run, tmp_path / "run")
    karpathy = write_karpathy(tmp_path / "flickr", "flickr30k", ["test"] * 6 + ["train"] * 2)
    manifest = write_manifest(tmp_path / "colours", ["red", "green", "blue", "green", "red", "blue"])
    names, templates = clip_benchmark_files(tmp_path)
    suite = f"""
name: formats
datasets:
  flickr:
    source: {{source: karpathy, path: {karpathy}, split: test}}
    tasks: [retrieval]
  colours:
    source: {{source: csv, path: {manifest}, label_keys: [label], classnames: {names}, templates: {templates},
              dataset_name: colours}}
    tasks: [zero_shot]
"""
    (tmp_path / "suite.yaml").write_text(suite)
    out = tmp_path / "out"
    assert (
        main(["eval", str(tmp_path / "run"), "--suite", str(tmp_path / "suite.yaml"), "--out", str(out)]) == 0
    )
    results = json.loads((out / "results.json").read_text())
    metrics = {(m["dataset"], m["evaluator"], m["name"]) for m in results["metrics"]}
    assert ("flickr", "retrieval", "image_retrieval_recall@1") in metrics
    assert ("flickr", "retrieval", "text_retrieval_recall@5") in metrics
    assert ("colours", "zero_shot", "acc1") in metrics
    zero_shot = next(m for m in results["metrics"] if m["evaluator"] == "zero_shot" and m["name"] == "acc1")
    assert zero_shot["label"] == "label" and 0.0 <= zero_shot["value"] <= 1.0
    (flickr,) = (tmp_path / "run" / "eval" / "cache").glob("flickr-*.pt")
    cached = torch.load(flickr, weights_only=False)
    assert torch.bincount(cached["caption_owner"]).tolist() == [5] * 6  # all captions of all 6 test images

    # the suite's source options are checked when it loads: a wrong dataset_name fails at once
    (tmp_path / "bad.yaml").write_text(suite.replace("dataset_name: colours", "dataset_name: colors"))
    with pytest.raises(ConfigError, match="datasets.colours.source: .*no dataset 'colors'"):
        load_suite(tmp_path / "bad.yaml")
