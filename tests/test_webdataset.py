"""WebDataset shards (issue #15, points 1 and 2): `coalign data pack | stat` and the `webdataset`
source, on generated files: what is packed reads back equal, bad inputs are counted not packed,
damaged shards are counted skips, the order is a pure function of (seed, epoch), and a run on
shards killed mid-shard with 2 workers resumes to the weights of an uninterrupted one."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import webdataset as wds
from PIL import Image

from coalign.checkpoint import latest_checkpoint, load_weights
from coalign.cli import main
from coalign.config import SourceSpec
from coalign.data.pack import encode_sample, pack, parse_bytes
from coalign.data.shards import MANIFEST, ShardWriter, scan_shard
from coalign.data.sources.base import SampleError
from coalign.data.sources.csv import CSVSource
from coalign.data.sources.webdataset import WebDatasetSource
from coalign.data.transforms.image import ImageTransform
from coalign.registry import SOURCES, ConfigError

ALL = ["image", "text", "audio", "points", "tabular"]


def world(size: int = 20, **options):
    return SOURCES.create("world", size=size, audio_seconds=0.05, num_points=32, image_size=16, **options)


def reasons(source) -> Counter:
    out: Counter = Counter()
    for i in range(len(source)):
        try:
            source[i]
        except SampleError as err:
            out[err.reason] += 1
    return out


@pytest.fixture(scope="module")
def world_shards(tmp_path_factory) -> tuple[Path, object, dict]:
    src = world(modalities=ALL, captions=2)
    out = tmp_path_factory.mktemp("world") / "shards"
    manifest = pack(src, out, shard_size=6, progress=False, spec={"source": "world"})
    return out, src, manifest


def test_world_packs_and_reads_back_equal(world_shards):
    out, src, manifest = world_shards
    assert manifest["samples"] == 20 and [s["samples"] for s in manifest["shards"]] == [6, 6, 6, 2]
    assert manifest["modalities"] == {m: 20 for m in ALL}
    for s in manifest["shards"]:
        assert (out / s["name"]).stat().st_size == s["bytes"]
    assert json.loads((out / MANIFEST).read_text())["zero_shot"]["shape"]["classnames"]
    shards = WebDatasetSource(path=str(out))
    assert len(shards) == 20 and set(shards.zero_shot_tasks()) == set(src.zero_shot_tasks())
    for i in range(20):
        got, want = shards[i], src[i]
        assert got["id"] == want["id"] and got["label"] == want["label"]
        assert got["text"] == want["text"] and len(got["text"]) == 2  # several captions survive
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(got["image"]))), want["image"])
        wave, _ = soundfile.read(io.BytesIO(got["audio"]), dtype="float32")
        assert np.array_equal(wave, want["audio"])
        assert np.array_equal(np.load(io.BytesIO(got["points"])), want["points"])
        assert got["tabular"] == want["tabular"]


def test_webdataset_package_reads_coalign_shards(world_shards):
    out, src, _ = world_shards
    samples = list(wds.WebDataset(str(out / "{000000..000003}.tar"), shardshuffle=False))
    assert len(samples) == 20
    first = samples[0]
    assert {"png", "txt", "json", "wav", "npy"} <= set(first)
    assert first["txt"].decode() == src[0]["text"][0]
    assert json.loads(first["json"])["label"] == src[0]["label"]


def test_brace_patterns_folders_and_lists(world_shards):
    out, _, _ = world_shards
    assert len(WebDatasetSource(path=str(out / "{000000..000001}.tar"))) == 12
    assert len(WebDatasetSource(path=[str(out / "000003.tar"), str(out / "00000{0,2}.tar")])) == 14
    # Without the manifest the counts come from the tar headers.
    bare = out.parent / "bare"
    shutil.copytree(out, bare)
    (bare / MANIFEST).unlink()
    assert len(WebDatasetSource(path=str(bare / "{000000..000003}.tar"))) == 20
    with pytest.raises(ConfigError, match="000004.tar"):
        WebDatasetSource(path=str(out / "{000003..000004}.tar"))


@pytest.fixture
def bad_csv(tmp_path) -> Path:
    """Four good rows (one JPEG), and rows with a corrupt image, a missing file, an empty caption and
    an unquoted separator."""
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(tmp_path / f"g{i}.png")
    Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "g3.jpg")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [
        "filepath,title,label",
        "g0.png,first,0",
        "bad.png,a corrupt image,1",
        "g1.png,second,1",
        "gone.png,a missing file,0",
        "g2.png,,0",
        "g2.png,third,0",
        "g3.jpg,a jpeg,1",
        "g0.png,an unquoted, comma,1",
    ]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "m.csv"


def test_csv_with_bad_rows_packs_only_good_ones(bad_csv, tmp_path):
    src = CSVSource(path=str(bad_csv), label_keys=["label"])
    manifest = pack(src, tmp_path / "out", shard_size=3, progress=False)
    assert manifest["samples"] == 4 and manifest["source_samples"] == 8
    assert manifest["skipped"] == {
        "counts": {"bad_row": 1, "corrupt_image": 1, "empty_caption": 1, "missing_image": 1},
        "rows": {"bad_row": [7], "corrupt_image": [1], "empty_caption": [4], "missing_image": [3]},
    }
    shards = WebDatasetSource(path=str(tmp_path / "out"))
    kept = [0, 2, 5, 6]
    assert [shards[i]["id"] for i in range(4)] == [str(row) for row in kept]
    for i, row in enumerate(kept):
        want, got = src[row], shards[i]
        assert got["text"] == want["text"] and got["label"] == want["label"]
        assert got["image"] == Path(want["image"]).read_bytes()  # files are packed byte for byte
    with tarfile.open(tmp_path / "out" / "000001.tar") as tar:
        assert tar.getnames() == ["000006.jpg", "000006.json", "000006.txt"]  # a key's members together


def test_max_shard_bytes_is_a_hard_limit(tmp_path):
    src = world(40)
    limit = parse_bytes("40K")
    manifest = pack(src, tmp_path / "out", shard_size=None, max_shard_bytes=limit, progress=False)
    assert len(manifest["shards"]) > 1 and sum(s["samples"] for s in manifest["shards"]) == 40
    for s in manifest["shards"]:
        assert s["bytes"] == (tmp_path / "out" / s["name"]).stat().st_size <= limit
    with pytest.raises(FileExistsError):
        pack(src, tmp_path / "out", progress=False)


def _damaged(folder: Path) -> Path:
    """Shard 0: six good samples, then one whose .json does not parse, one whose png does not decode,
    one without a .txt, one whose .txt is not UTF-8. Shard 1: four samples, cut in the third's image.
    Shard 2: not a tar."""
    folder.mkdir()
    good = world(10)
    writer = ShardWriter(folder, shard_size=10)
    for i in range(6):
        writer.write(f"{i:06d}", encode_sample(good[i]))
    members = encode_sample(good[6])
    writer.write("000006", {**members, "json": b'{"id": "x", "lab'})
    writer.write("000007", {**members, "png": b"\x89PNG\r\n\x1a\n garbage"})
    writer.write("000008", {k: v for k, v in members.items() if k != "txt"})
    writer.write("000009", {**members, "txt": b"caf\xe9"})
    for i in range(4):
        writer.write(f"{10 + i:06d}", encode_sample(good[i]))
    writer.close({})
    index = scan_shard(folder / "000001.tar")
    _, cut_in = index.samples[2]
    png = next(m for m in cut_in if m[0] == "png")
    with open(folder / "000001.tar", "r+b") as f:
        f.truncate(png[1] + png[2] // 2)
    (folder / "000002.tar").write_bytes(b"this is not a tar file" * 10)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["shards"].append({"name": "000002.tar", "samples": 3, "bytes": 220})
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_damaged_shards_and_members_are_counted_skips(tmp_path):
    src = WebDatasetSource(path=str(_damaged(tmp_path / "d")))
    assert len(src) == 10 + 4 + 3  # the manifest's counts keep every index in place
    assert reasons(src) == {
        "corrupt_record": 1,
        "missing_text": 1,
        "bad_encoding": 1,
        "truncated_shard": 2,  # the sample cut in its image and the one after it
        "corrupt_shard": 3,
    }
    image = ImageTransform(size=8)
    with pytest.raises(SampleError) as err:
        image(src[7]["image"], np.random.default_rng(0))
    assert err.value.reason == "corrupt_image"  # the transform counts a member that does not decode
    assert src[11]["id"] == "world-train-1"  # shard 1 up to the cut reads fine


def test_epoch_order_is_pure_local_and_resampled(world_shards):
    out, _, _ = world_shards
    a = WebDatasetSource(path=str(out), mix_shards=1)
    b = WebDatasetSource(path=str(out), mix_shards=1)
    order = [a.epoch_order(3, 1)[p] for p in range(20)]
    assert order == [b.epoch_order(3, 1)[p] for p in range(20)]  # a function of (seed, epoch) only
    assert sorted(order) == list(range(20)) and order != [a.epoch_order(3, 2)[p] for p in range(20)]
    shard_of = [a.locate(i)[0] for i in order]
    runs = [s for i, s in enumerate(shard_of) if i == 0 or s != shard_of[i - 1]]
    assert sorted(runs) == [0, 1, 2, 3]  # one shard at a time, each once
    mixed = WebDatasetSource(path=str(out), mix_shards=2).epoch_order(0, 0)
    start = 0
    for end in mixed.group_ends:  # each run of positions reads from 2 shards at most
        assert len({a.locate(mixed[p])[0] for p in range(start, int(end))}) <= 2
        start = int(end)
    fixed = WebDatasetSource(path=str(out), shuffle=False).epoch_order(0, 0)
    assert [fixed[p] for p in range(20)] == list(range(20))
    drawn = WebDatasetSource(path=str(out), resample=True)
    picks = [[drawn.epoch_order(0, e)[p] for p in range(20)] for e in range(4)]
    assert all(len(p) == 20 and all(0 <= i < 20 for i in p) for p in picks)
    assert any(len(set(p)) < 20 for p in picks)  # shards drawn with replacement repeat samples


def test_registry_example_and_cli_pack_stat(bad_csv, tmp_path, capsys):
    assert (
        main(["data", "pack", str(bad_csv), str(tmp_path / "out"), "--shard-size", "2", "--no-progress"]) == 0
    )
    out = capsys.readouterr().out
    assert "packed 4 of 8 samples into 2 shards" in out
    assert "1 corrupt image" in out and "1 empty caption" in out and "1 missing image" in out
    assert main(["data", "stat", str(tmp_path / "out" / "{000000..000001}.tar"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "4 samples in 2 shards" in out and "readable: 4" in out
    assert "image" in out and "100.0%" in out and "caption words: min 1" in out
    assert main(["data", "stat", str(tmp_path / "out"), "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["captions"]["words"]["max"] == 2 and report["skipped_when_packed"]["bad_row"] == 1
    assert main(["data", "stat", str(tmp_path / "nowhere")]) == 2
    options = WebDatasetSource.example(tmp_path / "example")
    assert len(WebDatasetSource(**options)) == 6


@pytest.mark.slow
def test_resume_on_shards_mid_shard_with_two_workers(tmp_path, tiny_recipe, monkeypatch):
    """Killed at step 5 (position 80: inside a shard, in the second pair of 24-sample shards shuffled
    together) and resumed: the same weights as an uninterrupted run (8 steps of 16 cross into the
    second epoch), both read by 2 DataLoader worker processes."""
    recipe = tiny_recipe("train.steps=8", "train.checkpoint_every=3", "data.batch_size=16")
    train_source = SOURCES.create(recipe.data.train.source, **recipe.data.train.options())
    pack(train_source, tmp_path / "shards", shard_size=24, progress=False)
    recipe.data.train = SourceSpec(source="webdataset", path=str(tmp_path / "shards"), mix_shards=2)
    recipe.data.num_workers = 2

    readers = tmp_path / "readers"  # each process that reads a sample appends its pid
    read = WebDatasetSource.__getitem__

    def spy(self, index):
        with open(readers, "a") as f:
            f.write(f"{os.getpid()}\n")
        return read(self, index)

    monkeypatch.setattr(WebDatasetSource, "__getitem__", spy)
    from coalign.train.loop import train

    full = train(recipe, tmp_path / "full", progress=False)
    pids = set(readers.read_text().split())
    readers.unlink()
    cut = train(recipe, tmp_path / "cut", progress=False, stop_after=5)
    resumed = train(None, tmp_path / "cut", resume=True, progress=False)
    assert full.step == resumed.step == 8 and cut.step == 5
    # Training batches are read in 2 worker processes per run; the main process reads only to fit
    # the tokenizer.
    main_pid = str(os.getpid())
    assert len(pids - {main_pid}) == 2 and len(set(readers.read_text().split()) - {main_pid}) == 4
    a = load_weights(latest_checkpoint(tmp_path / "full"))
    b = load_weights(latest_checkpoint(tmp_path / "cut"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert json.loads((tmp_path / "cut" / "data_report.json").read_text())["skipped"] == {}
