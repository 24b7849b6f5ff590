"""The built-in world: deterministic, seeded, paired multimodal samples that need no files.

Each sample is an object with attributes (shape, color, size, position) drawn on a varied
background, plus captions written from several templates that vary word order and wording, so a
model has to learn words rather than positions in a string. Attributes are kept as labels.
`modalities` picks what a sample carries: `image` and `text` by default, and also `points`,
`audio` and `tabular`, rendered from the same attributes by `world_modalities.py`.

A fixed set of shape-color pairs never appears in the `train` and `test` splits; the `heldout`
split contains only those pairs and so measures compositional generalisation.

Sample i of a split is a pure function of (seed, split, i): the world has any size, costs no
memory, and the same index always gives the same sample. The attributes, captions and image come
from the stream `[seed, split, i]`; each further modality draws from its own stream
`[seed, split, i, k]`, so a sample's image and text are the same whichever modalities are asked for.

The `xor` variant (for Symile-style experiments) hides one attribute from every single modality.
Two independent fair bits are drawn per sample: a = the rendered size of the object (the usual size
draw; image, points and tabular show it) and b (from stream k=4; audio loudness shows it). The
caption's size word states c = a XOR b. As a and b are independent and uniform, c is independent
of a alone and of b alone: the pairwise mutual information about c between the text and the image,
or the text and the audio, is zero, yet c is fixed by (image, audio) together. Labels keep all
three: "size" = c (what the text says), "image_bit" = a, "audio_bit" = b. Shape, colour and position
are as in the standard world. The "size" zero-shot task is kept: from any one tower it scores
chance by construction, and `zero_shot_fused` over (image, audio) shows whether an objective learnt
the three-way dependency (Symile's multilinear product can; sums of pairwise terms cannot).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pydantic

from coalign.data.sample import Sample
from coalign.data.sources.base import Source, ZeroShotTask, check_split
from coalign.data.world_modalities import render_audio, render_points, render_tabular
from coalign.registry import SOURCES, StrictModel

SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
SIZES = ["small", "large"]
POSITIONS = ["top", "bottom", "left", "right"]
ATTRIBUTES = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS}

RGB = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 70, 230),
    "yellow": (235, 220, 30),
    "purple": (150, 40, 200),
    "orange": (245, 135, 20),
}
CENTERS = {"top": (0.5, 0.25), "bottom": (0.5, 0.75), "left": (0.25, 0.5), "right": (0.75, 0.5)}
RADIUS = {"small": 0.11, "large": 0.2}  # fraction of the image side

# Shape-color pairs that train and test never contain; `heldout` contains only these.
HELDOUT_PAIRS = {(s, COLORS[(2 * i + 1) % len(COLORS)]) for i, s in enumerate(SHAPES)}
SPLITS = {"train": 0, "test": 1, "heldout": 2}
MODALITIES = ["image", "text", "points", "audio", "tabular"]
# Each added modality's own random stream [seed, split, index, k]; "xor_bit" is the xor variant's b.
STREAMS = {"points": 1, "audio": 2, "tabular": 3, "xor_bit": 4}

# Wording: synonyms for attribute values, and sentence structures that reorder them.
SYNONYMS = {
    "small": ["small", "little", "tiny"],
    "large": ["large", "big"],
    "top": ["at the top", "near the top", "in the upper part"],
    "bottom": ["at the bottom", "near the bottom", "in the lower part"],
    "left": ["on the left", "at the left", "on the left side"],
    "right": ["on the right", "at the right", "on the right side"],
}
NOUNS_WITHOUT_SHAPE = ["object", "shape", "thing"]
STRUCTURES = [
    "{a} {size} {color} {shape} {pos}",
    "{pos}, {a} {size} {color} {shape}",
    "{a} {shape} that is {color} and {size} {pos}",
    "there is {a} {size} {shape} colored {color} {pos}",
    "{a} {color} {shape}, {size}, {pos}",
    "{pos} you can see {a} {color} {size} {shape}",
    "a picture of {a} {size} {color} {shape} {pos}",
]

ZERO_SHOT_TEMPLATES = {
    "shape": ["a {}", "a picture of a {}", "there is a {}", "a {} shape"],
    "color": ["a {} object", "something {}", "a {} shape", "a {} thing"],
    "size": ["a {} object", "a {} thing", "a {} shape"],
    "position": ["an object at the {}", "a shape at the {}", "something at the {}"],
}


@dataclass(frozen=True)
class Attributes:
    shape: str
    color: str
    size: str
    position: str

    def labels(self) -> dict[str, int]:
        return {k: ATTRIBUTES[k].index(getattr(self, k)) for k in ATTRIBUTES}


def combinations(split: str) -> list[Attributes]:
    """Every attribute combination allowed in `split`."""
    held = split == "heldout"
    return [
        Attributes(s, c, z, p)
        for s in SHAPES
        for c in COLORS
        if ((s, c) in HELDOUT_PAIRS) == held
        for z in SIZES
        for p in POSITIONS
    ]


def caption(attrs: Attributes, rng: np.random.Generator, partial_prob: float = 0.0) -> str:
    """One caption of `attrs`; with probability `partial_prob` some attributes go unmentioned."""
    keep = {"shape": True, "color": True, "size": True, "position": True}
    if rng.random() < partial_prob:
        keep = {k: bool(rng.random() < 0.5) for k in keep}
        if not any(keep.values()):
            keep[str(rng.choice(list(keep)))] = True
    words = {
        "shape": attrs.shape if keep["shape"] else str(rng.choice(NOUNS_WITHOUT_SHAPE)),
        "color": attrs.color if keep["color"] else "",
        "size": str(rng.choice(SYNONYMS[attrs.size])) if keep["size"] else "",
        "pos": str(rng.choice(SYNONYMS[attrs.position])) if keep["position"] else "",
    }
    structure = str(rng.choice(STRUCTURES))
    if not keep["color"] and "colored {color}" in structure:
        structure = structure.replace(" colored {color}", "")
    if not (keep["color"] and keep["size"]) and "that is" in structure:
        both = " and ".join(w for w in (words["color"], words["size"]) if w)
        structure = structure.replace("that is {color} and {size}", f"that is {both}" if both else "")
    text = structure.format(a="{a}", **words)
    text = " ".join(text.replace(" ,", ",").split()).strip(" ,").replace(", ,", ",")
    text = text.replace(",,", ",")
    first = text.split("{a}", 1)[1].split()[0] if "{a}" in text else "x"
    text = text.replace("{a}", "an" if first[0] in "aeiou" else "a", 1)
    return text[0].lower() + text[1:]


# --------------------------------------------------------------------------------------------- image


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return c * x + s * y, -s * x + c * y


def _sdf(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) of a shape of radius r centred at the origin."""
    if shape == "circle":
        return np.hypot(x, y) - r
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) - 0.85 * r
    if shape == "diamond":
        return (np.abs(x) + np.abs(y) - 1.15 * r) / math.sqrt(2)
    if shape == "cross":
        arm, half = 0.32 * r, 1.0 * r
        bar1 = np.maximum(np.abs(x) - half, np.abs(y) - arm)
        bar2 = np.maximum(np.abs(x) - arm, np.abs(y) - half)
        return np.minimum(bar1, bar2)
    if shape == "triangle":  # equilateral, pointing up (image y grows downwards)
        k = math.sqrt(3)
        y = y - 0.25 * r
        edge1 = (k * x - y) / 2 - 0.5 * r * 1.1
        edge2 = (-k * x - y) / 2 - 0.5 * r * 1.1
        return np.maximum(np.maximum(edge1, edge2), y - 0.55 * r * 1.1)
    raise ValueError(f"unknown shape '{shape}'; valid shapes: {', '.join(SHAPES)}")


@functools.cache
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def render_image(attrs: Attributes, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """(size, size, 3) uint8: the object on a muted gradient background with texture."""
    yy, xx = _grid(size)
    # Background: a gradient between two muted colours, plus a few faint blobs and pixel noise.
    c0, c1 = rng.uniform(40, 170, size=(2, 3)) * np.array([1.0, 0.95, 0.9])
    c0 = c0.mean() + 0.35 * (c0 - c0.mean())  # desaturate so backgrounds never look like object colours
    c1 = c1.mean() + 0.35 * (c1 - c1.mean())
    angle = rng.uniform(0, 2 * math.pi)
    t = ((xx - size / 2) * math.cos(angle) + (yy - size / 2) * math.sin(angle)) / size + 0.5
    img = c0.astype(np.float32) * (1 - t[..., None]) + c1.astype(np.float32) * t[..., None]
    for _ in range(int(rng.integers(0, 4))):
        bx, by, br = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(3, size / 4)
        blob = np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * br**2))[..., None]
        img = img + blob * rng.uniform(-25, 25)
    img = img + 4 * rng.standard_normal(img.shape, dtype=np.float32)
    # Object: jittered centre, radius and hue; anti-aliased edge from the signed distance.
    cx, cy = CENTERS[attrs.position]
    cx = (cx + rng.uniform(-0.06, 0.06)) * size
    cy = (cy + rng.uniform(-0.06, 0.06)) * size
    r = RADIUS[attrs.size] * size * rng.uniform(0.9, 1.1)
    x, y = _rotate(xx - cx, yy - cy, rng.uniform(-0.25, 0.25))
    alpha = np.clip(0.5 - _sdf(attrs.shape, x, y, r), 0.0, 1.0)[..., None]
    color = np.array(RGB[attrs.color], dtype=np.float32) + rng.uniform(-18, 18, size=3)
    img = img * (1 - alpha) + color * alpha
    return np.clip(img, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- source


class WorldConfig(StrictModel):
    split: str = "train"
    size: int = pydantic.Field(50_000, ge=1)
    modalities: list[str] = ["image", "text"]  # any of MODALITIES; a sample carries only these
    variant: Literal["standard", "xor"] = "standard"  # "xor": see the module docstring
    image_size: int = pydantic.Field(64, ge=1)
    captions: int = pydantic.Field(
        1, ge=1
    )  # captions per sample (evaluation splits use several for retrieval)
    partial_caption_prob: float = pydantic.Field(
        0.3, ge=0.0, le=1.0
    )  # chance that a caption leaves some attributes out
    num_points: int = pydantic.Field(1024, ge=1)  # points per cloud
    sample_rate: int = pydantic.Field(16000, ge=1000)  # audio samples per second
    audio_seconds: float = pydantic.Field(1.0, gt=0.0)
    seed: int = 0
    cache: bool = True  # keep rendered samples in memory (a 64x64 sample is ~12 KB; 1 s of audio 64 KB)
    cache_mb: float = pydantic.Field(1024.0, ge=0.0)  # stop caching new samples past this many megabytes

    @classmethod
    def tiny(cls) -> dict:
        return {"size": 256}

    @pydantic.field_validator("modalities")
    @classmethod
    def _known_modalities(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in MODALITIES]
        if unknown or not v or len(set(v)) != len(v):
            problem = f"unknown {unknown}" if unknown else "empty or repeated entries"
            raise ValueError(f"{problem}; valid modalities: {', '.join(MODALITIES)}")
        return v

    @pydantic.field_validator("split")
    @classmethod
    def _known_split(cls, v: str) -> str:
        return check_split(v, SPLITS)


@SOURCES.register("world")
class WorldSource(Source):
    """The built-in world as a source: `sample["image"]` is a uint8 array, `sample["text"]` captions."""

    Config = WorldConfig

    def __init__(self, cfg: WorldConfig | None = None, **kwargs):
        self.cfg = cfg or WorldConfig(**kwargs)
        self.combos = combinations(self.cfg.split)
        self._cache: dict[int, Sample] = {}
        self._cache_bytes = 0

    def __len__(self) -> int:
        return self.cfg.size

    def rng(self, index: int, stream: str | None = None) -> np.random.Generator:
        """The generator of one sample: the main stream, or the named stream of one added modality."""
        key = [self.cfg.seed, SPLITS[self.cfg.split], index]
        return np.random.default_rng(key if stream is None else [*key, STREAMS[stream]])

    def attributes(self, index: int) -> Attributes:
        return self.combos[int(self.rng(index).integers(len(self.combos)))]

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(f"world index {index} out of range 0..{len(self) - 1}")
        if index in self._cache:
            return self._cache[index]
        sample = self._make(index)
        if self.cfg.cache:
            nbytes = sum(v.nbytes for v in sample.values() if isinstance(v, np.ndarray)) + 1024
            if self._cache_bytes + nbytes <= self.cfg.cache_mb * 2**20:
                self._cache[index] = sample
                self._cache_bytes += nbytes
        return sample

    def _make(self, index: int) -> Sample:
        cfg, want = self.cfg, set(self.cfg.modalities)
        rng = self.rng(index)
        attrs = self.combos[int(rng.integers(len(self.combos)))]
        label = attrs.labels()
        said, heard = attrs, attrs  # what the caption states, what the audio renders
        if cfg.variant == "xor":
            a, b = label["size"], int(self.rng(index, "xor_bit").integers(2))
            said = dataclasses.replace(attrs, size=SIZES[a ^ b])
            heard = dataclasses.replace(attrs, size=SIZES[b])
            label.update(size=a ^ b, image_bit=a, audio_bit=b)
        # Captions are drawn even when text is not wanted: the image comes next in the same stream.
        texts = [caption(said, rng, cfg.partial_caption_prob) for _ in range(cfg.captions)]
        sample: Sample = {"id": f"world-{cfg.split}-{index}"}
        if "image" in want:
            sample["image"] = render_image(attrs, rng, cfg.image_size)
        if "text" in want:
            sample["text"] = texts[0] if len(texts) == 1 else texts
        if "points" in want:
            points_rng = self.rng(index, "points")
            sample["points"] = render_points(attrs, RGB[attrs.color], points_rng, cfg.num_points)
        if "audio" in want:
            audio_rng = self.rng(index, "audio")
            sample["audio"] = render_audio(heard, audio_rng, cfg.sample_rate, cfg.audio_seconds)
        if "tabular" in want:
            sample["tabular"] = render_tabular(attrs, RGB[attrs.color], self.rng(index, "tabular"))
        sample["label"] = label
        return sample

    def zero_shot_tasks(self) -> dict[str, ZeroShotTask]:
        # In the xor variant "size" is what the caption says (c = a XOR b): see the module docstring.
        return {k: ZeroShotTask(k, list(v), ZERO_SHOT_TEMPLATES[k]) for k, v in ATTRIBUTES.items()}
