"""Fault injection: a corpus of planted bad files and rows, through real training and `embed`.

The corpus is built in tmp_path so that the number of each kind of bad sample is known by
construction; training (one exact epoch, 0 and 1 workers) and embedding must report exactly those
counts by reason, and the source index of every skipped sample (issue #10, points 2, 3 and 4).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coalign.config import load_recipe
from coalign.data.sources.base import SampleError, SkipCounter
from coalign.data.sources.csv import CSVSource
from coalign.data.sources.jsonl import JSONLSource
from coalign.data.transforms.image import ImageTransform, decode_image
from coalign.registry import ConfigError
from coalign.search import METADATA
from coalign.search.embed import embed_source

slow = pytest.mark.slow
GOOD = 9  # good rows in each manifest


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def blank_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of width x height, all black: tiny on disk (zeros compress
    ~1000:1), width * height * 3 bytes once decoded to RGB. A decompression bomb when large."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """imgs/: good{0..8}.png and every kind of bad image file (see BAD_IMAGES)."""
    root = tmp_path_factory.mktemp("corpus")
    imgs = root / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(GOOD):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(imgs / f"good{i}.png")
    noise = imgs / "noise.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noise)
    data = noise.read_bytes()
    noise.unlink()
    (imgs / "zero.png").write_bytes(b"")
    (imgs / "truncated.png").write_bytes(data[: len(data) // 2])
    (imgs / "wrong.png").write_text("filepath,title\nthis is a csv file, not a png\n")
    (imgs / "bomb.png").write_bytes(blank_png(20_000, 20_000))  # 400 Mpx: PIL's DecompressionBombError
    (imgs / "warn.png").write_bytes(blank_png(10_000, 9_000))  # 90 Mpx: PIL's DecompressionBombWarning
    (imgs / "huge.png").write_bytes(blank_png(6_000, 5_000))  # 30 Mpx: PIL decodes it without a word
    (imgs / "folder.png").mkdir()  # a directory where a file should be
    return root


# (image cell, caption cell) of the bad rows both manifests share, and the reason each is skipped.
BAD_IMAGES = [
    ("imgs/zero.png", "corrupt_image"),
    ("imgs/truncated.png", "corrupt_image"),
    ("imgs/wrong.png", "corrupt_image"),
    ("imgs/bomb.png", "image_too_large"),
    ("imgs/warn.png", "image_too_large"),
    ("imgs/huge.png", "image_too_large"),
    ("imgs/gone.png", "missing_image"),
    ("imgs/folder.png", "missing_image"),
]


def good(i: int) -> str:
    return f"imgs/good{i % GOOD}.png"


def csv_rows() -> list[tuple[bytes, str | None]]:
    """The raw lines of the csv body (bytes: some are not UTF-8) and each one's skip reason."""
    rows: list[tuple[bytes, str | None]] = [
        (f"{good(i)},caption number {i}".encode(), None) for i in range(8)
    ]
    rows.append((f'{good(8)},"caf\u00e9, na\u00efve \U0001f600"'.encode(), None))  # valid UTF-8
    rows += [(f"{img},a bad picture".encode(), reason) for img, reason in BAD_IMAGES]
    rows.append((b",no picture at all", "missing_image"))
    rows.append((f"{good(0)},".encode(), "empty_caption"))
    rows.append((f"{good(1)},   ".encode(), "empty_caption"))
    rows.append((f"{good(2)},caf".encode() + b"\xe9 latin-1", "bad_encoding"))
    rows.append((f"{good(3)},a surrogate ".encode() + b"\xed\xa0\x80 in CESU-8", "bad_encoding"))
    rows.append((f"{good(4)},an unquoted, comma".encode(), "bad_row"))
    rows.append((f'{good(5)},"{"x" * 200_000}"'.encode(), "bad_row"))  # over csv's field size limit
    return rows


def jsonl_lines() -> list[tuple[bytes, str | None]]:
    def line(image, caption) -> bytes:
        return json.dumps({"image": image, "caption": caption}).encode()

    lines = [(line(good(i), f"caption number {i}"), None) for i in range(8)]
    lines.append((line(good(8), ["a lone surrogate \ud800 here", "and a second caption"]), None))
    lines += [(line(img, "a bad picture"), reason) for img, reason in BAD_IMAGES]
    lines.append((line(None, "no picture at all"), "missing_image"))
    lines.append((line(good(0), ""), "empty_caption"))
    lines.append((line(good(1), ["  ", ""]), "empty_caption"))
    lines.append((b'{"image": "' + good(2).encode() + b'", "caption": "caf\xe9"}', "bad_encoding"))
    lines.append((b"[" * 100_000 + b"]" * 100_000, "corrupt_record"))
    lines.append((b'{"image": "imgs/good3.png", "capt', "corrupt_record"))
    lines.append((b'["imgs/good4.png", "not an object"]', "corrupt_record"))
    return lines


def expected(rows: list[tuple[bytes, str | None]]) -> tuple[dict[str, int], dict[str, list[int]]]:
    counts: dict[str, int] = {}
    where: dict[str, list[int]] = {}
    for index, (_, reason) in enumerate(rows):
        if reason is not None:
            counts[reason] = counts.get(reason, 0) + 1
            where.setdefault(reason, []).append(index)
    return counts, where


def write_manifest(corpus: Path, kind: str) -> tuple[Path, list[tuple[bytes, str | None]]]:
    rows = csv_rows() if kind == "csv" else jsonl_lines()
    header = [b"filepath,title"] if kind == "csv" else []
    path = corpus / f"bad.{kind}"
    path.write_bytes(b"\n".join(header + [r for r, _ in rows]) + b"\n")
    return path, rows


def tiny_recipe(manifest: Path, kind: str, num_workers: int, rows: int):
    """The demo's model, smoke-sized, over the manifest: 2 steps of half the rows = one exact epoch."""
    assert rows % 2 == 0
    overrides = [
        f"data.train={{source: {kind}, path: '{manifest}'}}",
        "data.eval={}",
        f"data.batch_size={rows // 2}",
        "train.steps=2",
        "eval.evaluators=[]",
    ]
    recipe = load_recipe("demo", overrides, smoke=True)
    recipe.data.num_workers = num_workers  # the smoke shrink sets 0
    return recipe


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_sources_skip_bad_rows_with_their_reason(corpus, kind):
    path, rows = write_manifest(corpus, kind)
    source = CSVSource(path=str(path)) if kind == "csv" else JSONLSource(path=str(path))
    assert len(source) == len(rows)
    for index, (_, reason) in enumerate(rows):
        try:
            source[index]  # most bad images and captions read fine here and fail in their transform
        except SampleError as err:
            assert err.reason == reason
            assert f"row {index}" in str(err) or "line" in str(err)
        else:
            assert reason not in ("bad_encoding", "bad_row", "corrupt_record")
    from coalign.data.sample import clean_text

    captions = source.captions()
    assert all(isinstance(t, str) and t.strip() and t == clean_text(t) for t in captions)


def test_one_caption_rule_replaces_lone_surrogates():
    from coalign.data.sample import captions, clean_text, first_caption

    assert clean_text("a \ud800 b") == "a \ufffd b"
    assert clean_text("\udfff\ud800") == "\ufffd\ufffd"
    assert clean_text("ok \U0001f600") == "ok \U0001f600"
    assert clean_text("\ud83d\ude00") == "\U0001f600"  # a pair spelt as two code points is one character
    assert captions(["", " ", "x \ud800", 3, "y"]) == ["x \ufffd", "y"] and captions(None) == []
    assert first_caption(["  ", "b \udc00"]) == "b \ufffd" and first_caption("") is None


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_batches_carry_exact_skip_counts(corpus, workers):
    """Issue #10.3: torch's default_convert re-added a SkipCounter to its copy, doubling the counts."""
    from coalign.data.loader import train_batches
    from coalign.data.transforms.base import Pipeline
    from coalign.data.transforms.text import BPETextTransform

    kinds = (None, "corrupt_image", "missing_image", "empty_caption")
    rows = [r for r in csv_rows() if r[1] in kinds and b"huge" not in r[0] and b"bomb" not in r[0]]
    rows = rows[: len(rows) // 2 * 2]
    path = corpus / f"plain{workers}.csv"
    path.write_bytes(b"\n".join([b"filepath,title"] + [r for r, _ in rows]) + b"\n")
    source = CSVSource(path=str(path))
    text = BPETextTransform(context_length=8, vocab_size=300)
    text.fit(source, None)
    pipeline = Pipeline({"image": ImageTransform(size=8), "text": text})
    batches = train_batches(source, pipeline, len(rows) // 2, seed=0, start_step=0, num_workers=workers)
    total: Counter = Counter()
    for _ in range(2):  # one exact epoch
        total.update(next(batches)["skipped"])
    assert dict(total) == expected(rows)[0]


def test_pixel_limit_is_checked_before_decoding(corpus):
    imgs = corpus / "imgs"
    for name in ("bomb.png", "warn.png", "huge.png"):
        with pytest.raises(SampleError) as err:
            decode_image(str(imgs / name))
        assert err.value.reason == "image_too_large"
        with pytest.raises(SampleError) as err:  # bytes take the same path
            decode_image((imgs / name).read_bytes())
        assert err.value.reason == "image_too_large"
    assert decode_image(str(imgs / "good0.png"), max_pixels=480).size == (24, 20)
    with pytest.raises(SampleError, match="image_too_large"):
        decode_image(str(imgs / "good0.png"), max_pixels=479)
    with pytest.raises(SampleError, match="image_too_large"):
        ImageTransform(size=8, max_pixels=100)(str(imgs / "good0.png"), np.random.default_rng(0))
    with pytest.raises(SampleError, match="image_too_large"):
        decode_image(np.zeros((30, 30, 3), np.uint8), max_pixels=100)


def test_skip_counter_counts_and_rows():
    a = SkipCounter()
    a.skip("corrupt_image", 3)
    a.skip("corrupt_image", 1)
    a["small_batch"] += 2  # the Counter API still counts
    b = SkipCounter()
    for i in range(30):
        b.skip("empty_caption", 100 + i)
    a.update(b)
    assert dict(a) == {"corrupt_image": 2, "small_batch": 2, "empty_caption": 30}
    assert a.rows["corrupt_image"] == [3, 1] and a.rows["empty_caption"] == list(range(100, 120))
    record = a.record()
    json.dumps(record)
    again = SkipCounter.from_record(record)
    assert again == a and again.rows == a.rows


def test_a_file_that_cannot_be_read_is_a_one_line_error(corpus, tmp_path):
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "binary.csv").write_bytes((corpus / "imgs" / "good0.png").read_bytes())
    (tmp_path / "binary.jsonl").write_bytes((corpus / "imgs" / "good0.png").read_bytes())
    (tmp_path / "dir.csv").mkdir()
    for path, cls in [
        ("empty.csv", CSVSource),
        ("binary.csv", CSVSource),
        ("dir.csv", CSVSource),
        ("binary.jsonl", JSONLSource),
    ]:
        with pytest.raises(ConfigError) as err:
            cls(path=str(tmp_path / path))
        message = str(err.value)
        assert "\n" not in message and message.encode("utf-8")  # printable, one line


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """Train on each manifest with 0 and 1 workers; keep the csv run (0 workers) for embedding."""
    from coalign.train.loop import train  # the test trains; the library never imports the loop

    reports = {}
    for kind in ("csv", "jsonl"):
        path, rows = write_manifest(corpus, kind)
        for workers in (0, 1):
            out = tmp_path_factory.mktemp("run") / f"{kind}{workers}"
            result = train(tiny_recipe(path, kind, workers, len(rows)), out, progress=False)
            assert result.step == 2
            reports[kind, workers] = (out, json.loads((out / "data_report.json").read_text()))
    return reports


@slow
@pytest.mark.parametrize("kind", ["csv", "jsonl"])
@pytest.mark.parametrize("workers", [0, 1])
def test_training_counts_every_planted_bad_row_once(corpus, trained, kind, workers):
    _, rows = write_manifest(corpus, kind)
    counts, where = expected(rows)
    _, report = trained[kind, workers]
    assert report["skipped"] == counts  # no small_batch: every half-epoch batch has good rows
    assert {k: sorted(v) for k, v in report["skipped_rows"].items()} == where


@slow
@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_embedding_reports_the_same_counts_as_training(corpus, trained, tmp_path, kind):
    path, rows = write_manifest(corpus, kind)
    counts, where = expected(rows)
    run_dir, report = trained["csv", 0]
    summary = embed_source(run_dir, str(path), tmp_path / "out", batch_size=4, shard_size=10, progress=False)
    assert summary["skipped"] == counts == trained[kind, 0][1]["skipped"]
    assert {k: sorted(v) for k, v in summary["skipped_rows"].items()} == where
    assert summary["rows"] == GOOD
    if kind == "jsonl":  # the lone surrogate reached the metadata as U+FFFD, not as a crash
        import pyarrow.parquet as pq

        captions = pq.read_table(tmp_path / "out" / METADATA).column("caption").to_pylist()
        assert "a lone surrogate \ufffd here" in captions
