"""Datasets for `vs_openclip.py`: labelled captioned images written as PNG files plus an OpenCLIP-format
CSV (`filepath`, `title`, then one integer column per label), so both trainers read the same files.

Two generators:

- `world`: coalign's built-in world (shape, colour, size, position; train and test splits), exported;
- `scenes`: a scene generator of its own that is not the world: five shapes in six colours and three
  sizes at one of five places (the four quadrants and the centre), on a noisy two-colour gradient,
  rotated and jittered, with captions from their own templates and synonyms.

Each dataset also says how to write a *prompt* for one combination of label values, which is what the
benchmark's zero-shot classes are made of (class = mean over the prompts naming it with every value of
the other labels).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from coalign.data import world

Labels = dict[str, int]


@dataclass(frozen=True)
class Dataset:
    name: str
    labels: dict[str, list[str]]  # label key -> class names, in label order
    samples: Callable[[str, int, int], Iterator[tuple[Image.Image, str, Labels]]]  # (split, n, size)
    prompt: Callable[[dict[str, str]], str]  # class names of every label -> one caption naming them


# ------------------------------------------------------------------------------------------- the world


def world_samples(split: str, n: int, size: int) -> Iterator[tuple[Image.Image, str, Labels]]:
    # held-out captions name every attribute, so retrieval is not blurred by partial captions
    partial = 0.0 if split != "train" else world.WorldConfig().partial_caption_prob
    source = world.WorldSource(
        split=split, size=n, image_size=size, cache=False, partial_caption_prob=partial
    )
    for i in range(n):
        s = source[i]
        yield Image.fromarray(s["image"]), s["text"], s["label"]


def world_prompt(names: dict[str, str]) -> str:
    syn = world.SYNONYMS
    return f"a {syn[names['size']][0]} {names['color']} {names['shape']} {syn[names['position']][0]}"


WORLD = Dataset("world", {k: list(v) for k, v in world.ATTRIBUTES.items()}, world_samples, world_prompt)

# ------------------------------------------------------------------------------------------- scenes

SCENE_LABELS = {
    "shape": ["circle", "square", "triangle", "star", "hexagon"],
    "color": ["red", "green", "blue", "yellow", "magenta", "white"],
    "size": ["small", "medium", "large"],
    "position": ["top left", "top right", "bottom left", "bottom right", "center"],
}
SCENE_RGB = {
    "red": (225, 40, 35),
    "green": (40, 200, 60),
    "blue": (45, 80, 235),
    "yellow": (240, 225, 40),
    "magenta": (225, 50, 200),
    "white": (245, 245, 245),
}
SCENE_RADIUS = {"small": 0.09, "medium": 0.14, "large": 0.2}
SCENE_CENTRE = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
SCENE_WORDS = {
    "small": ["small", "tiny"],
    "medium": ["medium", "mid-sized"],
    "large": ["large", "huge"],
    "top left": ["in the top left", "in the upper left corner"],
    "top right": ["in the top right", "in the upper right corner"],
    "bottom left": ["in the bottom left", "in the lower left corner"],
    "bottom right": ["in the bottom right", "in the lower right corner"],
    "center": ["in the center", "in the middle"],
}
SCENE_TEMPLATES = [
    "a {size} {color} {shape} {pos}",
    "{pos} there is a {color} {shape}, {size}",
    "a picture with a {size} {shape} colored {color} {pos}",
    "{pos}: one {color} {size} {shape}",
    "a {color} {shape} of {size} size {pos}",
]
SCENE_SPLITS = {"train": 11, "test": 12}  # the random stream of each split


def polygon(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    corners = {"square": 4, "triangle": 3, "hexagon": 6}.get(shape)
    if corners is not None:
        radius = [r * (1.25 if shape == "square" else 1.1)] * corners
    else:  # a five-pointed star: alternating outer and inner radii
        corners, radius = 10, [r * (1.2 if k % 2 == 0 else 0.5) for k in range(10)]
    return [
        (cx + radius[k] * math.cos(turn + 2 * math.pi * k / corners),
         cy + radius[k] * math.sin(turn + 2 * math.pi * k / corners))
        for k in range(corners)
    ]  # fmt: skip


def scene_image(names: dict[str, str], rng: np.random.Generator, size: int) -> Image.Image:
    a, b = rng.integers(10, 110, size=(2, 3))
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    grad = a * (1 - t) + b * t  # (size, 1, 3) vertical gradient of two dark colours
    pixels = np.broadcast_to(grad, (size, size, 3)) + rng.normal(0, 12, (size, size, 3))
    if rng.random() < 0.5:
        pixels = pixels.transpose(1, 0, 2)  # horizontal gradient instead
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    jitter = rng.uniform(-0.04, 0.04, 2)
    cx, cy = (np.array(SCENE_CENTRE[names["position"]]) + jitter) * size
    r = SCENE_RADIUS[names["size"]] * size * rng.uniform(0.9, 1.1)
    shade = np.clip(np.array(SCENE_RGB[names["color"]]) + rng.integers(-20, 21, 3), 0, 255)
    fill = tuple(int(c) for c in shade)
    if names["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(polygon(names["shape"], cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=fill)
    return img


def scene_caption(names: dict[str, str], rng: np.random.Generator) -> str:
    words = {k: names[k] for k in ("shape", "color")}
    words["size"] = str(rng.choice(SCENE_WORDS[names["size"]]))
    words["pos"] = str(rng.choice(SCENE_WORDS[names["position"]]))
    return str(rng.choice(SCENE_TEMPLATES)).format(**words)


def scene_samples(split: str, n: int, size: int) -> Iterator[tuple[Image.Image, str, Labels]]:
    for i in range(n):
        rng = np.random.default_rng([SCENE_SPLITS[split], i])
        labels = {k: int(rng.integers(len(v))) for k, v in SCENE_LABELS.items()}
        names = {k: SCENE_LABELS[k][v] for k, v in labels.items()}
        yield scene_image(names, rng, size), scene_caption(names, rng), labels


def scene_prompt(names: dict[str, str]) -> str:
    return f"a {names['size']} {names['color']} {names['shape']} {SCENE_WORDS[names['position']][0]}"


SCENES = Dataset("scenes", SCENE_LABELS, scene_samples, scene_prompt)
DATASETS = {d.name: d for d in (WORLD, SCENES)}

# ------------------------------------------------------------------------------------------- export


def export(dataset: Dataset, folder: Path, split: str, n: int, size: int) -> Path:
    """Write `n` samples of `split` as PNG files under folder/split/ and folder/split.csv (comma
    separated, OpenCLIP's default column names); reuse them when a previous export matches."""
    manifest, marker = folder / f"{split}.csv", folder / f"{split}.json"
    wanted = {"dataset": dataset.name, "split": split, "n": n, "size": size}
    if manifest.is_file() and marker.is_file() and json.loads(marker.read_text()) == wanted:
        return manifest
    (folder / split).mkdir(parents=True, exist_ok=True)
    keys = list(dataset.labels)
    with open(manifest.with_suffix(".tmp"), "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["filepath", "title", *keys])
        for i, (img, caption, labels) in enumerate(dataset.samples(split, n, size)):
            path = folder / split / f"{i:06d}.png"
            img.save(path)
            out.writerow([str(path.absolute()), caption, *(labels[k] for k in keys)])
    manifest.with_suffix(".tmp").replace(manifest)
    marker.write_text(json.dumps(wanted))
    return manifest


def read_manifest(path: Path, keys: list[str]) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
    """(image paths, captions, label key -> (N,) ints) of an exported split."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    labels = {k: np.array([int(r[k]) for r in rows]) for k in keys}
    return [r["filepath"] for r in rows], [r["title"] for r in rows], labels
