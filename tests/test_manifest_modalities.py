"""CSV and JSONL manifests that carry any modality: file paths per modality, inline tabular records,
missing modalities left out of the sample, and `required` ones turned into counted SampleErrors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from coalign.data.loader import BatchDataset
from coalign.data.sources.base import SampleError
from coalign.data.sources.csv import CSVSource, parse_cell
from coalign.data.sources.jsonl import JSONLSource
from coalign.data.transforms.base import Pipeline
from coalign.data.transforms.image import ImageTransform
from coalign.data.transforms.text import BPETextTransform
from coalign.registry import SOURCES, ConfigError

TONE = (0.5 * np.sin(2 * np.pi * 440 * np.arange(800) / 8000)).astype(np.float32)  # 0.1 s at 8 kHz
CLOUD = np.arange(15, dtype=np.float32).reshape(5, 3)  # (N, 3)


@pytest.fixture
def media(tmp_path: Path) -> Path:
    """media/red.png, media/tone.wav (a real 440 Hz wav) and media/cloud.npy (5 xyz points)."""
    (tmp_path / "media").mkdir()
    Image.fromarray(np.full((8, 8, 3), (220, 30, 30), dtype=np.uint8)).save(tmp_path / "media" / "red.png")
    sf.write(tmp_path / "media" / "tone.wav", TONE, 8000, subtype="FLOAT")
    np.save(tmp_path / "media" / "cloud.npy", CLOUD)
    return tmp_path


HEADER = ["id", "filepath", "title", "wav", "cloud", "age", "colour", "y"]


def body(root: Path) -> list[list[str]]:
    """a: everything; b: no audio, half a tabular record; c: no image/points/tabular, an absolute wav path;
    d: a caption only; e: nothing at all."""
    abs_wav = str(root / "media" / "tone.wav")
    return [
        ["a", "media/red.png", "a red tone", "media/tone.wav", "media/cloud.npy", "42", "red", "0"],
        ["b", "media/red.png", "a silent red square", "", "media/cloud.npy", " 3.5 ", "", "1"],
        ["c", "", "a tone without a picture", abs_wav, "", "", "", "2"],
        ["d", "", "just words", "", "", "", "", "0"],
        ["e", "", "", "", "", "", "", "1"],
    ]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def csv_source(path: Path, **options) -> CSVSource:
    cfg = dict(
        path=str(path),
        modality_keys={"audio": "wav", "points": "cloud"},
        tabular_keys=["age", "colour"],
        label_keys=["y"],
    )
    return SOURCES.create("csv", **(cfg | options))


def reason(source, index: int) -> str:
    with pytest.raises(SampleError) as err:
        source[index]
    return err.value.reason


# ----------------------------------------------------------------------------------------------- csv


def test_csv_every_modality_keys_and_values(media: Path) -> None:
    src = csv_source(write_csv(media / "m.csv", HEADER, body(media)), required=["text"])
    assert isinstance(src, CSVSource) and len(src) == 5
    m = media.absolute() / "media"
    assert src[0] == {
        "id": "a",
        "image": str(m / "red.png"),
        "text": "a red tone",
        "audio": str(m / "tone.wav"),
        "points": str(m / "cloud.npy"),
        "tabular": {"age": 42, "colour": "red"},
        "label": {"y": 0},
    }
    assert type(src[0]["tabular"]["age"]) is int
    # The paths name the real files: what the audio and points transforms will read.
    audio, rate = sf.read(src[0]["audio"], dtype="float32")
    assert rate == 8000 and np.array_equal(audio, TONE)
    assert np.array_equal(np.load(src[0]["points"]), CLOUD)
    # An empty cell is a missing modality (or a missing tabular field), not an error.
    assert set(src[1]) == {"id", "image", "text", "points", "tabular", "label"}
    assert src[1]["tabular"] == {"age": 3.5}
    assert src[2] == {
        "id": "c",
        "text": "a tone without a picture",
        "audio": str(m / "tone.wav"),  # an absolute path stays as it is
        "label": {"y": 2},
    }
    assert src[3] == {"id": "d", "text": "just words", "label": {"y": 0}}
    assert src[4] == {"id": "e", "text": "", "label": {"y": 1}}  # required text: "" -> empty_caption later


def test_csv_required_modalities(media: Path) -> None:
    path = write_csv(media / "m.csv", HEADER, body(media))
    src = csv_source(path)  # default: image (image_key is set) and text are required
    assert set(src[0]) >= {"image", "audio"} and src[1]["image"].endswith("red.png")
    assert reason(src, 2) == "missing_image"
    src = csv_source(path, required=["text", "audio"])
    assert "audio" in src[0] and reason(src, 1) == "missing_audio" and "audio" in src[2]
    assert reason(csv_source(path, required=["points"]), 2) == "missing_points"
    assert reason(csv_source(path, required=["tabular"]), 2) == "missing_tabular"
    assert csv_source(path, required=["tabular"])[1]["tabular"] == {"age": 3.5}  # half a record is a record
    src = csv_source(path, required=[])  # nothing required: no caption leaves text out, an empty row fails
    assert src[3] == {"id": "d", "text": "just words", "label": {"y": 0}}
    assert reason(src, 4) == "no_modalities"
    with pytest.raises(ConfigError) as err:
        csv_source(path, required=["audo"])
    msg = str(err.value)
    assert "'audo'" in msg and "did you mean 'audio'" in msg and "image, text, audio, points, tabular" in msg
    with pytest.raises(ConfigError, match="caption_key"):
        csv_source(path, caption_key=None, required=["text"])


def test_csv_audio_text_manifest_without_images(media: Path) -> None:
    rows = [["media/tone.wav", "a beep"], ["", "no sound"]]
    path = write_csv(media / "at.csv", ["wav", "caption"], rows)
    src = CSVSource(path=str(path), image_key=None, caption_key="caption", modality_keys={"audio": "wav"})
    assert src[0] == {
        "id": "0",
        "text": "a beep",
        "audio": str((media / "media" / "tone.wav").absolute()),
        "label": {},
    }
    assert src[1] == {"id": "1", "text": "no sound", "label": {}}


def test_csv_unknown_columns_name_the_option_and_the_available_columns(media: Path) -> None:
    path = write_csv(media / "m.csv", HEADER, body(media))
    available = ", ".join(HEADER)
    with pytest.raises(ConfigError) as err:
        csv_source(path, modality_keys={"audio": "wave"})
    msg = str(err.value)
    assert "modality_keys.audio 'wave' not found" in msg and "did you mean 'wav'" in msg and available in msg
    with pytest.raises(ConfigError) as err:
        csv_source(path, tabular_keys=["age", "colour", "height"])
    assert "tabular_keys[2] 'height' not found" in str(err.value) and available in str(err.value)
    with pytest.raises(ConfigError, match="use image_key"):
        csv_source(path, modality_keys={"image": "filepath"})
    with pytest.raises(ConfigError, match="not a modality name"):
        csv_source(path, modality_keys={"audio@v1": "wav"})
    with pytest.raises(ConfigError, match="no modality configured"):
        SOURCES.create("csv", path=str(path), image_key=None, caption_key=None)


def test_relative_paths_resolve_against_root_or_the_manifest_folder(media: Path) -> None:
    rows = [["media/tone.wav", "media/cloud.npy", "x"]]
    path = write_csv(media / "meta" / "m.csv", ["wav", "cloud", "title"], rows)
    options = dict(image_key=None, modality_keys={"audio": "wav", "points": "cloud"})
    beside = CSVSource(path=str(path), **options)[0]
    assert beside["audio"] == str((media / "meta" / "media" / "tone.wav").absolute())
    rooted = CSVSource(path=str(path), root=str(media), **options)[0]
    assert rooted["audio"] == str((media / "media" / "tone.wav").absolute())
    assert rooted["points"] == str((media / "media" / "cloud.npy").absolute())
    assert Path(rooted["audio"]).is_file() and Path(rooted["points"]).is_file()


def test_parse_cell_numbers_where_they_parse() -> None:
    assert [parse_cell(s) for s in ["7", "-3", " 2.5 ", "1e3", ".5", "red", "1_000", "3 cm", "007"]] == [
        7, -3, 2.5, 1000.0, 0.5, "red", "1_000", "3 cm", 7
    ]  # fmt: skip
    assert np.isnan(parse_cell("NaN")) and parse_cell("-inf") == -np.inf


def test_optional_image_is_a_presence_mask_in_the_batch(media: Path) -> None:
    src = CSVSource(path=str(write_csv(media / "m.csv", HEADER, body(media))), required=["text"])
    text = BPETextTransform(context_length=8, vocab_size=300)
    text.fit(src, None)
    batch = BatchDataset(src, Pipeline({"image": ImageTransform(size=8), "text": text}), 5, seed=0)[0]
    assert sorted(batch["id"]) == ["a", "b", "c", "d"] and dict(batch["skipped"]) == {"empty_caption": 1}
    has_image = [i in ("a", "b") for i in batch["id"]]
    assert batch["present"]["image"].tolist() == has_image
    assert batch["image"].shape == (2, 3, 8, 8) and batch["text"].shape == (4, 8)


# --------------------------------------------------------------------------------------------- jsonl


def test_jsonl_files_inline_values_and_missing_modalities(media: Path) -> None:
    lines = [
        {"id": "a", "image": "media/red.png", "caption": ["red", "a red tone"], "wav": "media/tone.wav",
         "cloud": "media/cloud.npy", "meta": {"age": 42, "colour": "red", "unit": None}, "mass": 1.5},
        {"id": "b", "image": None, "caption": "a tone", "wav": "media/tone.wav",
         "cloud": [[0, 1, 2], [3, 4, 5]], "meta": '{"age": 7}'},
        {"id": "c", "caption": "nothing else", "meta": {}, "mass": ""},
        {"id": "d", "caption": "bad cloud", "cloud": [["x", 1, 2]]},
        {"id": "e", "caption": "bad record", "meta": 5},
    ]  # fmt: skip
    text = "\n".join(json.dumps(line) for line in lines[:2]) + '\n{"id": "broken", \n\n'
    path = media / "m.jsonl"
    path.write_text(text + "\n".join(json.dumps(line) for line in lines[2:]) + "\n")
    src = SOURCES.create(
        "jsonl",
        path=str(path),
        modality_keys={"audio": "wav", "points": "cloud"},
        tabular_key="meta",
        tabular_keys=["mass"],
        required=["text"],
    )
    assert isinstance(src, JSONLSource) and len(src) == 6
    m = media.absolute() / "media"
    assert src[0] == {
        "id": "a",
        "image": str(m / "red.png"),
        "text": ["red", "a red tone"],
        "audio": str(m / "tone.wav"),
        "points": str(m / "cloud.npy"),
        "tabular": {"age": 42, "colour": "red", "mass": 1.5},
        "label": {},
    }
    b = src[1]
    assert set(b) == {"id", "text", "audio", "points", "tabular", "label"}  # image: null is a missing image
    assert b["points"].dtype == np.float32 and np.array_equal(b["points"], [[0, 1, 2], [3, 4, 5]])
    assert b["tabular"] == {"age": 7}  # a JSON string of an object is the same record
    assert reason(src, 2) == "corrupt_record"
    assert src[3] == {"id": "c", "text": "nothing else", "label": {}}
    assert reason(src, 4) == "corrupt_points"
    assert reason(src, 5) == "corrupt_tabular"
    default = JSONLSource(path=str(path), modality_keys={"audio": "wav"})  # default: image and text required
    assert default[0]["audio"] == str(m / "tone.wav") and reason(default, 1) == "missing_image"


def test_jsonl_keys_are_checked_against_every_line(media: Path) -> None:
    path = media / "k.jsonl"
    lines = [{"image": "media/red.png", "caption": "red"}, {"caption": "a beep", "wav": "media/tone.wav"}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    src = JSONLSource(path=str(path), modality_keys={"audio": "wav"}, required=["text"])  # on line 2 only
    assert "audio" not in src[0] and src[1]["audio"].endswith("tone.wav") and "image" not in src[1]
    with pytest.raises(ConfigError) as err:
        JSONLSource(path=str(path), modality_keys={"audio": "sound"})
    msg = str(err.value)
    assert "modality_keys.audio 'sound' not found" in msg and "available: caption, image, wav" in msg
    with pytest.raises(ConfigError, match="tabular_key 'meta' not found"):
        JSONLSource(path=str(path), tabular_key="meta")
