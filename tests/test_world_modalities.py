"""The world's points, audio and tabular modalities, and its xor variant."""

import hashlib

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from coalign.data.world import ATTRIBUTES, MODALITIES, SIZES, SYNONYMS, WorldSource
from coalign.data.world_modalities import BASE_FREQUENCY, TABULAR_CATEGORICAL, TABULAR_NUMERIC, sample_surface
from coalign.registry import SOURCES, ConfigError

ALL = ["image", "text", "points", "audio", "tabular"]

# sha256 of image bytes, caption and labels, computed before the new modalities were added.
BEFORE = {
    ("train", 0, 1): (
        "5f07b915d394f5752c2742c38df58309e61d16e1009b1f7197ff67f7db38e2a6",
        "a green cross",
        {"shape": 4, "color": 1, "size": 0, "position": 2},
    ),
    ("test", 3, 2): (
        "ea4da956d8a2ba8d08cfcdcca009d34178c6950f19df5a76b03773e7154c2f1a",
        ["near the top, a tiny purple circle", "a purple circle, small, at the top"],
        {"shape": 0, "color": 4, "size": 0, "position": 0},
    ),
    ("heldout", 0, 2): (
        "b42c0cb837edd1b36d12d0cfa2e33d06da6ec49b9cdd6d3b1bae1ad48e95f63e",
        ["a yellow cross, large, on the right", "a cross that is yellow and large at the right"],
        {"shape": 4, "color": 3, "size": 1, "position": 3},
    ),
}


def _digest(image: np.ndarray) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


@pytest.mark.parametrize("modalities", [["image", "text"], ALL])
def test_image_and_text_unchanged(modalities):
    for (split, index, captions), (digest, text, label) in BEFORE.items():
        sample = WorldSource(split=split, size=10, captions=captions, modalities=modalities)[index]
        assert _digest(sample["image"]) == digest
        assert sample["text"] == text and sample["label"] == label
    old_seed = WorldSource(size=10, image_size=32, seed=5)[7]
    assert _digest(old_seed["image"]) == "5419cdd5dc9d21ebd37efd6377601d52833ff3798c142e33877e4fb89fb81490"


def test_samples_carry_only_requested_modalities():
    assert set(WorldSource(size=2)[0]) == {"id", "image", "text", "label"}
    assert set(WorldSource(size=2, modalities=["audio", "text"])[0]) == {"id", "audio", "text", "label"}
    assert set(WorldSource(size=2, modalities=ALL)[0]) == {"id", "label", *ALL}
    assert sorted(MODALITIES) == sorted(ALL)


def test_config_errors_name_valid_choices():
    with pytest.raises(ConfigError, match="valid modalities: image, text, points, audio, tabular"):
        SOURCES.create("world", modalities=["image", "smell"])
    with pytest.raises(ConfigError, match="modalities"):
        SOURCES.create("world", modalities=[])
    with pytest.raises(ConfigError, match="'standard' or 'xor'"):
        SOURCES.create("world", variant="and")
    with pytest.raises(ConfigError, match="num_points"):
        SOURCES.create("world", num_points=0)


def test_deterministic_and_independent_of_other_modalities():
    a = WorldSource(size=5, modalities=ALL)
    b = WorldSource(size=5, modalities=ALL, cache=False)
    only = {m: WorldSource(size=5, modalities=[m], cache=False) for m in ("points", "audio", "tabular")}
    for i in range(3):
        for m in ("points", "audio"):
            assert np.array_equal(a[i][m], b[i][m]) and np.array_equal(a[i][m], only[m][i][m])
        assert a[i]["tabular"] == b[i]["tabular"] == only["tabular"][i]["tabular"]
    assert not np.array_equal(a[0]["points"], a[1]["points"])
    other_seed = WorldSource(size=5, modalities=["audio"], seed=1)
    assert not np.array_equal(a[0]["audio"], other_seed[0]["audio"])


def test_shapes_dtypes_and_ranges():
    s = WorldSource(size=3, modalities=ALL)[0]
    assert s["points"].shape == (1024, 6) and s["points"].dtype == np.float32
    assert s["points"][:, 3:].min() >= 0 and s["points"][:, 3:].max() <= 1
    assert s["audio"].shape == (16000,) and s["audio"].dtype == np.float32 and np.abs(s["audio"]).max() <= 1
    assert set(s["tabular"]) <= {*TABULAR_NUMERIC, *TABULAR_CATEGORICAL}
    small = WorldSource(
        size=1, modalities=["points", "audio"], num_points=100, sample_rate=8000, audio_seconds=0.5
    )
    assert small[0]["points"].shape == (100, 6) and small[0]["audio"].shape == (4000,)


def test_cache_budget_keeps_output_same():
    src = WorldSource(size=4, modalities=["audio"], cache_mb=0)
    first = src[1]["audio"]
    assert not src._cache and np.array_equal(first, src[1]["audio"])
    cached = WorldSource(size=4, modalities=["audio"])
    cached[1]
    assert 1 in cached._cache


def test_sound_follows_colour_and_position():
    src = WorldSource(size=60, modalities=["audio"], partial_caption_prob=0.0)
    freqs = np.fft.rfftfreq(16000, 1 / 16000)
    for i in range(len(src)):
        s = src[i]
        color, position = (ATTRIBUTES[k][s["label"][k]] for k in ("color", "position"))
        peak = freqs[np.argmax(np.abs(np.fft.rfft(s["audio"])))]
        assert abs(peak / BASE_FREQUENCY[color] - 1) < 0.035  # +-3% jitter, 1 Hz bins
        early, late = np.abs(s["audio"][:8000]).mean(), np.abs(s["audio"][8000:]).mean()
        assert (early > late) == (position in ("top", "right"))  # early note / fading note


def test_solids_are_sampled_uniformly_on_their_surfaces():
    rng = np.random.default_rng(0)
    sphere = sample_surface("circle", 2000, rng)
    assert np.allclose(np.linalg.norm(sphere, axis=1), 1)
    cube = sample_surface("square", 6000, rng)
    assert np.allclose(np.abs(cube).max(1), 0.85)
    faces = np.argmax(np.abs(cube), axis=1) * 2 + (cube[np.arange(6000), np.argmax(np.abs(cube), 1)] > 0)
    assert np.all(np.abs(np.bincount(faces, minlength=6) / 6000 - 1 / 6) < 0.02)  # area-uniform
    octa = sample_surface("diamond", 2000, rng)
    assert np.allclose(np.abs(octa).sum(1), 1.15)
    tetra = sample_surface("triangle", 2000, rng)  # apex up, base plane at y = -1.1/3
    assert np.isclose(tetra[:, 1].max(), 1.1, atol=0.05) and np.isclose(tetra[:, 1].min(), -1.1 / 3)
    assert abs(np.mean(np.isclose(tetra[:, 1], -1.1 / 3)) - 0.25) < 0.03  # the base is 1 of 4 equal faces
    plus = np.abs(sample_surface("cross", 4000, rng))
    arm = 0.32
    bars = np.array([[1, arm, arm], [arm, 1, arm], [arm, arm, 1]])
    in_union = np.any(np.all(plus[:, None] <= bars[None] + 1e-9, axis=2), axis=1)
    strictly_inside = np.any(np.all(plus[:, None] < bars[None] - 1e-9, axis=2), axis=1)
    assert in_union.all() and not strictly_inside.any()  # on the outer surface of the union of bars


def test_points_sit_where_the_position_says():
    src = WorldSource(size=40, modalities=["points"])
    for i in range(len(src)):
        s = src[i]
        position = ATTRIBUTES["position"][s["label"]["position"]]
        centre = np.median(s["points"][:, :3], axis=0)
        expect = {"top": (0, 1), "bottom": (0, -1), "left": (-1, 0), "right": (1, 0)}[position]
        assert np.abs(centre[:2] - expect).max() < 0.45


# --------------------------------------------------------------------------------------------- learnable


def _points_features(p: np.ndarray) -> dict[str, np.ndarray]:
    xyz, rgb = p[:, :3], p[:, 3:]
    centre = np.median(xyz, axis=0)
    dist = np.linalg.norm(xyz - centre, axis=1)
    core = dist < np.quantile(dist, 0.9)  # drop clutter
    radial = np.histogram(dist[core] / dist[core].max(), bins=8, range=(0, 1))[0] / core.sum()
    return {"color": np.median(rgb, 0), "position": centre[:2], "size": [np.median(dist)], "shape": radial}


def _audio_features(w: np.ndarray) -> dict[str, np.ndarray]:
    spec, freqs = np.abs(np.fft.rfft(w)), np.fft.rfftfreq(len(w), 1 / 16000)
    f0 = freqs[np.argmax(spec)]

    def level(f: float) -> float:
        band = (freqs > 0.97 * f) & (freqs < 1.03 * f)
        return spec[band].max() if band.any() else 0.0

    harmonics = [np.log(level(k * f0) / level(f0) + 1e-4) for k in (2, 3, 4, 5, 2.76, 5.40)]
    frames = np.abs(w).reshape(10, -1).mean(1)
    return {
        "color": [np.log(f0)],
        "shape": harmonics,
        "size": [np.quantile(np.abs(w), 0.995)],
        "position": frames / frames.max(),
    }


def _tabular_features(r: dict) -> dict[str, np.ndarray]:
    def num(*fields: str) -> np.ndarray:
        return np.nan_to_num(np.array([r.get(f, np.nan) for f in fields], float))

    return {
        "color": num("hue"),
        "size": num("area"),
        "position": num("x", "y"),
        "shape": num("edges", "tilt"),
    }


@pytest.fixture(scope="module")
def rendered():
    src = WorldSource(size=300, modalities=["points", "audio", "tabular"], cache=False)
    return [src[i] for i in range(len(src))]


@pytest.mark.parametrize(
    "modality, features, floor",
    [
        ("points", _points_features, 0.85),
        ("audio", _audio_features, 0.9),
        ("tabular", _tabular_features, 0.75),
    ],
)
def test_each_modality_encodes_every_attribute(rendered, modality, features, floor):
    """Simple hand features + a 5-nearest-neighbour classifier recover each attribute far above chance."""
    feats = [features(s[modality]) for s in rendered]
    for attr in ATTRIBUTES:
        x = np.array([np.ravel(f[attr]) for f in feats])
        y = np.array([s["label"][attr] for s in rendered])
        clf = make_pipeline(StandardScaler(), KNeighborsClassifier(5)).fit(x[:200], y[:200])
        acc = clf.score(x[200:], y[200:])
        assert acc >= floor, f"{modality} {attr}: accuracy {acc:.2f} (chance {1 / len(ATTRIBUTES[attr]):.2f})"


def test_tabular_square_and_diamond_differ_only_in_tilt(rendered):
    by_shape = {}
    for s in rendered:
        by_shape.setdefault(ATTRIBUTES["shape"][s["label"]["shape"]], []).append(s["tabular"])
    edges = {k: np.nanmedian([r.get("edges", np.nan) for r in v]) for k, v in by_shape.items()}
    tilt = {k: np.nanmedian([r.get("tilt", np.nan) for r in v]) for k, v in by_shape.items()}
    assert edges["square"] == edges["diamond"] == 4 and abs(tilt["diamond"] - tilt["square"] - 45) < 5


# ------------------------------------------------------------------------------------------------- xor


def test_xor_variant_hides_size_from_each_single_modality():
    src = WorldSource(size=1200, variant="xor", modalities=["text"], partial_caption_prob=0.0)
    labels = [src[i]["label"] for i in range(len(src))]
    a, b, c = (np.array([lab[k] for lab in labels]) for k in ("image_bit", "audio_bit", "size"))
    assert np.array_equal(c, a ^ b)  # determined by the two together
    for bit in (a, b):  # ... yet independent of either alone: P(c=1 | bit) ~ 1/2 both ways
        assert abs(bit.mean() - 0.5) < 0.06
        for v in (0, 1):
            assert abs(c[bit == v].mean() - 0.5) < 0.06
    assert abs(np.mean(a == b) - 0.5) < 0.06  # a and b independent
    for i in range(50):  # the caption states c
        text, size = src[i]["text"], SIZES[labels[i]["size"]]
        assert any(w in text for w in SYNONYMS[size]) and not any(
            w in text for other in SIZES if other != size for w in SYNONYMS[other]
        )


def test_xor_image_shows_a_and_audio_shows_b():
    standard = WorldSource(size=150, modalities=["image"])
    with_image = WorldSource(size=150, variant="xor", modalities=["image"])
    for i in range(10):  # the image is rendered with a, the usual size draw
        assert np.array_equal(with_image[i]["image"], standard[i]["image"])
        assert with_image[i]["label"]["image_bit"] == standard[i]["label"]["size"]
    xor = WorldSource(size=150, variant="xor", modalities=["audio"])
    samples = [xor[i] for i in range(len(xor))]
    loud = np.array([np.quantile(np.abs(s["audio"]), 0.995) for s in samples])
    b, c = (np.array([s["label"][k] for s in samples]) for k in ("audio_bit", "size"))
    guess = loud > np.median(loud)
    assert np.mean(guess == b) > 0.95  # loudness carries b
    assert abs(np.mean(guess == c) - 0.5) < 0.12  # ... and nothing about c


def test_xor_zero_shot_size_is_what_the_caption_says():
    source = WorldSource(size=50, variant="xor", modalities=["image", "text", "audio"])
    assert set(source.zero_shot_tasks()) == set(ATTRIBUTES)
    for i in range(50):
        s = source[i]
        assert s["label"]["size"] == s["label"]["image_bit"] ^ s["label"]["audio_bit"]
    assert set(WorldSource(size=1)[0]["label"]) == set(ATTRIBUTES)
