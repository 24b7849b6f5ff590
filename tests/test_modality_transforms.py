"""The audio, points and tabular transforms: decoding files, fixed shapes, augmentation, errors."""

import json
import math

import numpy as np
import pytest
import soundfile
import torch

from coalign.data.collate import collate
from coalign.data.sources.base import SampleError
from coalign.data.transforms.audio import resample
from coalign.data.transforms.base import Pipeline
from coalign.data.transforms.points import farthest_point_indices
from coalign.data.transforms.tabular import STATS_FILE
from coalign.data.world import WorldSource
from coalign.registry import TRANSFORMS, ConfigError


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def reason(fn) -> str:
    with pytest.raises(SampleError) as err:
        fn()
    return err.value.reason


def tone(freq: float, n: int, rate: int) -> np.ndarray:
    return (0.5 * np.sin(2 * math.pi * freq * np.arange(n) / rate)).astype(np.float32)


def peak_hz(wave: np.ndarray, rate: int) -> float:
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[np.argmax(np.abs(np.fft.rfft(wave)))])


# ------------------------------------------------------------------------------------------------- audio


def test_audio_pads_and_crops_to_fixed_length():
    t = TRANSFORMS.create("audio", seconds=0.5, sample_rate=1000).eval()
    assert t.describe() == {"sample_rate": 1000, "num_samples": 500}
    short = np.arange(1, 301, dtype=np.float32) / 300
    out = t(short, rng())
    assert out.shape == (500,) and out.dtype == torch.float32
    assert torch.equal(out[:300], torch.from_numpy(short)) and not out[300:].any()
    long = np.arange(900, dtype=np.float32) / 900
    assert torch.equal(t(long, rng(1)), torch.from_numpy(long[200:700]))  # centre crop, any rng
    assert torch.equal(t(long, rng(1)), t(long, rng(2)))


def test_audio_training_crop_gain_and_shift():
    long = np.arange(900, dtype=np.float32) / 900 + 0.1
    crop = TRANSFORMS.create("audio", seconds=0.5, sample_rate=1000, gain_db=0, shift_seconds=0)
    starts = set()
    for seed in range(10):
        out = crop(long, rng(seed)).numpy()
        start = int(np.argmin(np.abs(long - out[0])))
        assert np.array_equal(out, long[start : start + 500])  # a window of the input
        starts.add(start)
    assert len(starts) > 3
    gain = TRANSFORMS.create("audio", seconds=0.5, sample_rate=1000, gain_db=6, shift_seconds=0)
    ratios = [float(gain(long[:500], rng(s))[0] / long[0]) for s in range(20)]
    assert all(10 ** (-6 / 20) - 1e-6 <= r <= 10 ** (6 / 20) + 1e-6 for r in ratios) and np.std(ratios) > 0.1
    shift = TRANSFORMS.create("audio", seconds=0.5, sample_rate=1000, gain_db=0, shift_seconds=0.02)
    lags = set()
    for seed in range(10):
        out, x = shift(long[:500], rng(seed)).numpy(), long[:500]
        lag = 250 - int(np.argmin(np.abs(x - out[250])))  # out[i] = x[i - lag]
        lags.add(lag)
        assert abs(lag) <= 20
        if lag >= 0:
            assert np.array_equal(out[lag:], x[: 500 - lag]) and not out[:lag].any()  # zero-filled, no wrap
        else:
            assert np.array_equal(out[:lag], x[-lag:]) and not out[lag:].any()
    assert len(lags) > 3


def test_audio_file_round_trip(tmp_path):
    wave = tone(440, 16000, 16000)
    soundfile.write(tmp_path / "a.wav", wave, 16000, subtype="FLOAT")
    soundfile.write(tmp_path / "a.flac", wave, 16000)  # 16-bit
    soundfile.write(tmp_path / "stereo.wav", np.stack([wave, -0.5 * wave], axis=1), 16000, subtype="FLOAT")
    t = TRANSFORMS.create("audio").eval()
    assert torch.equal(t(str(tmp_path / "a.wav"), rng()), torch.from_numpy(wave))
    assert torch.allclose(t(tmp_path / "a.flac", rng()), torch.from_numpy(wave), atol=1e-4)
    assert torch.allclose(t(str(tmp_path / "stereo.wav"), rng()), torch.from_numpy(0.25 * wave), atol=1e-6)
    assert torch.equal(t((tmp_path / "a.wav").read_bytes(), rng()), torch.from_numpy(wave))


def test_audio_resampling_is_band_limited(tmp_path):
    # A tone with a whole number of cycles is band-limited and periodic: FFT resampling is exact.
    n_in = 8000
    x = np.sin(2 * math.pi * 5 * np.arange(n_in) / n_in)
    y = resample(x, 8000, 16000)
    assert y.shape == (16000,) and np.allclose(
        y, np.sin(2 * math.pi * 5 * np.arange(16000) / 16000), atol=1e-5
    )
    assert np.allclose(resample(y, 16000, 8000), x, atol=1e-5)
    # Downsampling drops what the new rate cannot hold instead of folding it back (aliasing).
    rate = 48000
    both = tone(3000, rate, rate) + tone(11000, rate, rate)
    soundfile.write(tmp_path / "hi.wav", both, rate, subtype="FLOAT")
    out = TRANSFORMS.create("audio").eval()(str(tmp_path / "hi.wav"), rng()).numpy()  # 16 kHz
    spec, freqs = np.abs(np.fft.rfft(out)), np.fft.rfftfreq(len(out), 1 / 16000)
    assert abs(peak_hz(out, 16000) - 3000) <= 1
    assert spec[np.abs(freqs - 5000) < 20].max() < 1e-3 * spec.max()  # 11 kHz would alias to 5 kHz
    low = 8000
    soundfile.write(tmp_path / "low.wav", tone(440, low, low), low, subtype="FLOAT")
    up = TRANSFORMS.create("audio").eval()(str(tmp_path / "low.wav"), rng()).numpy()
    assert abs(peak_hz(up, 16000) - 440) <= 1


def test_audio_arrays_of_other_types():
    t = TRANSFORMS.create("audio", seconds=0.01, sample_rate=1000).eval()
    pcm = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    assert torch.allclose(t(pcm, rng())[:4], torch.tensor([0.0, 0.5, -1.0, 32767 / 32768]))
    assert torch.allclose(
        t(np.array([128, 192, 0], dtype=np.uint8), rng())[:3], torch.tensor([0.0, 0.5, -1.0])
    )
    stereo = np.stack([np.ones(10), np.zeros(10)])  # (channels, samples)
    assert torch.allclose(t(stereo, rng()), torch.full((10,), 0.5))
    assert torch.allclose(t(torch.ones(10), rng()), torch.ones(10))


def test_audio_errors(tmp_path):
    t = TRANSFORMS.create("audio")
    assert reason(lambda: t(str(tmp_path / "nope.wav"), rng())) == "missing_audio"
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really a wave file")
    assert reason(lambda: t(str(tmp_path / "bad.wav"), rng())) == "corrupt_audio"
    assert reason(lambda: t(b"\x00\x01garbage", rng())) == "corrupt_audio"
    assert reason(lambda: t(np.array([0.0, np.nan]), rng())) == "corrupt_audio"
    assert reason(lambda: t(np.zeros(0), rng())) == "corrupt_audio"
    assert reason(lambda: t(np.zeros((2, 3, 4)), rng())) == "corrupt_audio"
    assert reason(lambda: t(np.array(["a", "b"]), rng())) == "corrupt_audio"
    with pytest.raises(ConfigError, match="sample_rate"):
        TRANSFORMS.create("audio", sample_rate=10)


# ------------------------------------------------------------------------------------------------ points


def cloud(n: int = 50, seed: int = 0) -> np.ndarray:
    r = rng(seed)
    return np.concatenate([r.normal(size=(n, 3)), r.random((n, 3))], axis=1).astype(np.float32)


def test_points_eval_is_deterministic_and_evenly_spaced():
    t = TRANSFORMS.create("points", num_points=10).eval()
    assert t.describe() == {"num_points": 10, "channels": 3}
    pts = cloud(50)
    out = t(pts, rng(1))
    assert out.shape == (10, 6) and out.dtype == torch.float32
    assert torch.equal(out, torch.from_numpy(pts[::5])) and torch.equal(out, t(pts, rng(2)))
    few = t(pts[:4], rng())  # fewer points than asked: all of them, then repeats
    assert torch.equal(few, torch.from_numpy(pts[np.arange(10) % 4]))
    fps = TRANSFORMS.create("points", num_points=10, eval_sampling="fps").eval()
    assert torch.equal(fps(pts, rng()), torch.from_numpy(pts[farthest_point_indices(pts[:, :3], 10)]))


def test_farthest_point_sampling_matches_brute_force():
    xyz = cloud(60, seed=3)[:, :3].astype(np.float64)
    picked = [int(np.argmax(np.linalg.norm(xyz - xyz.mean(0), axis=1)))]
    while len(picked) < 12:
        gaps = [min(np.linalg.norm(p - xyz[q]) for q in picked) for p in xyz]
        picked.append(int(np.argmax(gaps)))
    assert farthest_point_indices(xyz, 12).tolist() == picked
    perm = rng(4).permutation(60)  # the start rule does not depend on point order
    assert sorted(perm[farthest_point_indices(xyz[perm], 12)].tolist()) == sorted(picked)


def test_points_training_subsample_rotation_and_jitter():
    pts = cloud(50)
    plain = TRANSFORMS.create("points", num_points=20, rotate=False, jitter=0.0)
    out = plain(pts, rng()).numpy()
    rows = {tuple(r) for r in pts}
    assert all(tuple(r) in rows for r in out) and len({tuple(r) for r in out}) == 20  # no repeats
    small = plain(pts[:5], rng()).numpy()
    assert {tuple(r) for r in small} == {tuple(r) for r in pts[:5]}  # every point, then repeats
    spin = TRANSFORMS.create("points", num_points=50, rotate=True, jitter=0.0, up_axis="z")
    turned = spin(pts, rng(7)).numpy()
    matched = turned[np.argsort(turned[:, 2])], pts[np.argsort(pts[:, 2])]  # z, colours untouched
    assert np.allclose(matched[0][:, 2:], matched[1][:, 2:])
    assert np.allclose(np.hypot(*matched[0][:, :2].T), np.hypot(*matched[1][:, :2].T), atol=1e-5)
    assert not np.allclose(matched[0][:, :2], matched[1][:, :2])
    shaky = TRANSFORMS.create("points", num_points=50, rotate=False, jitter=0.05)
    out = shaky(pts, rng()).numpy()
    source = pts[np.argsort(pts[:, 3])][np.argsort(np.argsort(out[:, 3]))]  # rows matched by colour
    assert np.array_equal(out[:, 3:], source[:, 3:])
    assert 0.04 < np.std(out[:, :3] - source[:, :3]) < 0.06


def test_points_normalize_and_channels():
    pts = cloud(40) * np.array([3, 3, 3, 1, 1, 1], np.float32) + np.array([5, 0, 0, 0, 0, 0], np.float32)
    out = TRANSFORMS.create("points", num_points=40, normalize=True).eval()(pts, rng()).numpy()
    assert np.allclose(out[:, :3].mean(0), 0, atol=1e-5)
    assert np.isclose(np.linalg.norm(out[:, :3], axis=1).max(), 1)
    assert np.array_equal(out[:, 3:], pts[:, 3:])
    xyz_only = TRANSFORMS.create("points", num_points=40, channels=0).eval()
    assert xyz_only(pts, rng()).shape == (40, 3)
    assert reason(lambda: TRANSFORMS.create("points").eval()(pts[:, :4], rng())) == "corrupt_points"


def _ply(vertices: np.ndarray, fmt: str, colors: np.ndarray | None, faces: bool) -> bytes:
    props = "property float x\nproperty float y\nproperty float z\n"
    if colors is not None:
        props += "property uchar red\nproperty uchar green\nproperty uchar blue\n"
    face_header = "element face 1\nproperty list uchar int vertex_indices\n" if faces else ""
    vertex = f"element vertex {len(vertices)}\n"
    header = f"ply\nformat {fmt} 1.0\ncomment made by a test\n{vertex}{props}{face_header}end_header\n"
    if fmt == "ascii":
        rows = [
            " ".join(
                [
                    *(repr(float(v)) for v in p),
                    *(str(int(c)) for c in (colors[i] if colors is not None else [])),
                ]
            )
            for i, p in enumerate(vertices)
        ]
        return (header + "\n".join(rows) + "\n" + ("3 0 1 2\n" if faces else "")).encode()
    order = "<" if fmt == "binary_little_endian" else ">"
    fields = [("x", order + "f4"), ("y", order + "f4"), ("z", order + "f4")]
    fields += [(c, "u1") for c in ("red", "green", "blue")] if colors is not None else []
    table = np.zeros(len(vertices), dtype=fields)
    for i, a in enumerate("xyz"):
        table[a] = vertices[:, i]
    if colors is not None:
        for i, c in enumerate(("red", "green", "blue")):
            table[c] = colors[:, i]
    face = (np.array([3], "u1").tobytes() + np.array([0, 1, 2], order + "i4").tobytes()) if faces else b""
    return header.encode() + table.tobytes() + face


@pytest.mark.parametrize("fmt", ["ascii", "binary_little_endian", "binary_big_endian"])
def test_points_ply_round_trip(tmp_path, fmt):
    xyz = rng().normal(size=(30, 3)).astype(np.float32)
    colors = rng(1).integers(0, 256, size=(30, 3))
    (tmp_path / "c.ply").write_bytes(_ply(xyz, fmt, colors, faces=True))
    (tmp_path / "p.ply").write_bytes(_ply(xyz, fmt, None, faces=False))
    t = TRANSFORMS.create("points", num_points=30).eval()
    out = t(str(tmp_path / "c.ply"), rng()).numpy()
    assert np.allclose(out[:, :3], xyz) and np.allclose(out[:, 3:], colors / 255, atol=1e-6)
    assert np.allclose(
        TRANSFORMS.create("points", num_points=30, channels=0).eval()(tmp_path / "p.ply", rng()), xyz
    )
    assert reason(lambda: t(str(tmp_path / "p.ply"), rng())) == "corrupt_points"  # no colours, 3 expected


def test_points_npy_round_trip_and_bytes(tmp_path):
    pts = cloud(16)
    np.save(tmp_path / "c.npy", pts)
    t = TRANSFORMS.create("points", num_points=16).eval()
    assert torch.equal(t(str(tmp_path / "c.npy"), rng()), torch.from_numpy(pts))
    assert torch.equal(t((tmp_path / "c.npy").read_bytes(), rng()), torch.from_numpy(pts))
    assert torch.equal(
        t(_ply(pts[:, :3], "ascii", (pts[:, 3:] * 255).round(), False), rng())[:, :3],
        torch.from_numpy(pts[:, :3]),
    )


def test_points_errors(tmp_path):
    t = TRANSFORMS.create("points")
    assert reason(lambda: t(str(tmp_path / "none.ply"), rng())) == "missing_points"
    good = _ply(rng().normal(size=(30, 3)), "binary_little_endian", rng().integers(0, 256, (30, 3)), False)
    bad = {
        "garbage.ply": b"not a ply at all",
        "noend.ply": b"ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\n",
        "truncated.ply": good[: len(good) - 40],
        "short.ply": b"ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
        b"property float z\nend_header\n1 2 3\n",
        "noxyz.ply": b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float a\nend_header\n1\n",
        "weird.ply": b"ply\nformat binary_middle_endian 1.0\nelement vertex 1\nproperty float x\n"
        b"end_header\n",
        "garbage.npy": b"\x93NUMPY nonsense",
        "shape.npy": None,
        "cloud.xyz": b"1 2 3\n",
    }
    np.save(tmp_path / "shape.npy", np.zeros((4, 2)))
    for name, data in bad.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        assert reason(lambda n=name: t(str(tmp_path / n), rng())) == "corrupt_points", name
    assert reason(lambda: t(np.full((5, 6), np.nan), rng())) == "corrupt_points"
    assert reason(lambda: t(np.zeros((0, 6)), rng())) == "corrupt_points"


# ----------------------------------------------------------------------------------------------- tabular

FIELDS = {"numeric": ["a", "b"], "categorical": {"kind": ["x", "y", "z"]}}


class Records:
    """A minimal source of tabular records."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return {"id": str(i), "tabular": self.records[i]}


def fitted(tmp_path, **options):
    records = [
        {"a": 1.0, "b": "10", "kind": "x"},
        {"a": 3.0, "b": None},
        {"a": 5.0, "b": 30, "kind": "q"},
        {},
    ]
    t = TRANSFORMS.create("tabular", **FIELDS, **options)
    t.fit(Records(records), tmp_path)
    return t


def test_tabular_fit_standardises_and_indexes(tmp_path):
    t = fitted(tmp_path).eval()
    assert t.describe() == {"numeric": 2, "categories": [4]}
    assert np.allclose(t.mean, [3.0, 20.0]) and np.allclose(t.std, [np.std([1, 3, 5]), 10.0])
    out = t({"a": 3.0 + np.std([1, 3, 5]), "b": 0, "kind": "z"}, rng())
    assert out.dtype == torch.float32 and torch.allclose(out, torch.tensor([1.0, -2.0, 2.0]))
    out = t({"a": 1.0, "b": "nan", "kind": "never seen"}, rng())
    assert math.isnan(out[1]) and np.isclose(out[0], -np.sqrt(1.5)) and out[2] == 3  # NaN; unknown -> 3
    assert t({"a": 1.0}, rng())[2] == 3  # missing categorical -> unknown too
    assert torch.equal(
        t(json.dumps({"a": 5, "b": 20, "kind": "y"}), rng()), torch.tensor([math.sqrt(1.5), 0.0, 1.0])
    )


def test_tabular_save_and_load(tmp_path):
    t = fitted(tmp_path).eval()
    saved = json.loads((tmp_path / STATS_FILE).read_text())
    assert saved["numeric"]["b"] == {"mean": 20.0, "std": 10.0}
    fresh = TRANSFORMS.create("tabular", **FIELDS).eval()
    fresh.load(tmp_path)
    record = {"a": 2.0, "b": 11, "kind": "y"}
    assert torch.equal(fresh(record, rng()), t(record, rng()))
    other = TRANSFORMS.create("tabular", numeric=["a", "c"], categorical={})
    with pytest.raises(ValueError, match=r"\['c'\]"):
        other.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        TRANSFORMS.create("tabular", **FIELDS).load(tmp_path / "elsewhere")


def test_tabular_errors(tmp_path):
    t = fitted(tmp_path)
    assert reason(lambda: t({"unrelated": 1}, rng())) == "missing_tabular"
    assert reason(lambda: t({"a": None, "kind": ""}, rng())) == "missing_tabular"
    assert reason(lambda: t("", rng())) == "missing_tabular"
    assert reason(lambda: t({"a": "ten"}, rng())) == "corrupt_tabular"
    assert reason(lambda: t({"a": float("inf")}, rng())) == "corrupt_tabular"
    assert reason(lambda: t("{not json", rng())) == "corrupt_tabular"
    assert reason(lambda: t([1, 2], rng())) == "corrupt_tabular"
    with pytest.raises(RuntimeError, match="fit"):
        TRANSFORMS.create("tabular", **FIELDS)({"a": 1}, rng())
    with pytest.raises(ValueError, match="'typo'"):
        TRANSFORMS.create("tabular", numeric=["a", "typo"], categorical={}).fit(Records([{"a": 1}]), None)
    with pytest.raises(ConfigError, match="listed twice"):
        TRANSFORMS.create("tabular", numeric=["a"], categorical={"a": ["x"]})
    with pytest.raises(ConfigError, match="non-empty"):
        TRANSFORMS.create("tabular", numeric=[], categorical={"k": []})


def test_tabular_training_noise_and_drop_only_when_training(tmp_path):
    t = fitted(tmp_path, noise=0.5, drop_prob=0.5)
    record = {"a": 3.0, "b": 20, "kind": "x"}
    outs = torch.stack([t(record, rng(s)) for s in range(40)])
    assert outs[:, 0].isnan().any() and (outs[:, 2] == 3).any() and (outs[:, 2] == 0).any()
    assert outs[:, 0].nan_to_num().std() > 0.1
    t.eval()
    assert torch.equal(t(record, rng(1)), torch.tensor([0.0, 0.0, 0.0])) and torch.equal(
        t(record, rng(2)), t(record, rng(3))
    )


# ------------------------------------------------------------------------------------------- the world


def test_world_through_the_transforms(tmp_path):
    src = WorldSource(size=6, modalities=["points", "audio", "tabular"])
    transforms = {
        "points": TRANSFORMS.create("points", num_points=64),
        "audio": TRANSFORMS.create("audio"),
        "tabular": TRANSFORMS.create("tabular"),  # defaults: the world's fields
    }
    transforms["tabular"].fit(src, tmp_path)
    pipe = Pipeline(transforms)
    samples = [pipe(src[i], rng(i)) for i in range(len(src))]
    batch = collate(samples, pipe.modalities())
    assert batch["points"].shape == (6, 64, 6) and batch["audio"].shape == (6, 16000)
    assert batch["tabular"].shape == (6, 8) and transforms["tabular"].describe()["categories"] == [3, 4]
    assert batch["label"]["color"].shape == (6,)
