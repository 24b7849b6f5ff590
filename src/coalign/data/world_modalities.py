"""The built-in world's non-visual modalities: point clouds, sounds and tabular records.

Each `render_*` turns an object's attributes (shape, color, size, position, as attribute names) into
one raw value, with enough nuisance variation that a model has to learn the mapping rather than read
one number off:

- points: the object as a 3-D solid (circle -> sphere, square -> cube, triangle -> tetrahedron,
  diamond -> octahedron, cross -> a plus of three bars), surface-sampled, scaled by size, moved by
  position (top/bottom/left/right -> +y/-y/-x/+x; y is up), turned about the vertical axis at
  random, jittered, with a few clutter points; colour per point from the object colour plus noise.
- audio: a tone whose pitch is the colour (six base frequencies a fourth apart, +-3%), whose timbre
  (harmonic profile) is the shape, whose loudness is the size and whose time envelope is the
  position (top: early note, bottom: late note, left: crescendo, right: decrescendo), over background
  noise and mains hum. Every cue shows in a log-mel spectrogram.
- tabular: a record of noisy numeric fields (hue, area, x, y, edges, tilt) and two coarse
  categorical fields with label noise (tone, region); some fields are missing. Square and diamond
  share an edge count and differ only in tilt, so shape needs two fields together.

This module depends on nothing in `world.py` (which imports it); colours arrive as RGB triples.
"""

from __future__ import annotations

import colorsys
import functools
import math
from typing import Any, Protocol

import numpy as np


class HasAttributes(Protocol):
    shape: str
    color: str
    size: str
    position: str


# Shared 3-D geometry (points and tabular): object radius by size, centre by position (x right, y up).
SIZE_RADIUS = {"small": 0.44, "large": 0.8}
POSITION_XY = {"top": (0.0, 1.0), "bottom": (0.0, -1.0), "left": (-1.0, 0.0), "right": (1.0, 0.0)}

# ------------------------------------------------------------------------------------------ points

CLUTTER_FRACTION = 0.03  # points scattered in the scene, not on the object


def _box(lo: tuple[float, float, float], hi: tuple[float, float, float]) -> np.ndarray:
    """(12, 3, 3) triangles of the axis-aligned box [lo, hi]."""
    corners = np.array(
        [[(lo, hi)[i][0], (lo, hi)[j][1], (lo, hi)[k][2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    )
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    tris = [tri for a, b, c, d in quads for tri in ((a, b, c), (a, c, d))]  # two triangles per face
    return corners[np.array(tris)]


def _plus(arm: float) -> np.ndarray:
    """(60, 3, 3) outer surface of a 3-D plus: six arms of half-width `arm` reaching out to 1.

    The central cube is covered on every side by an arm, so the surface is each arm's box less the
    face it shares with the cube: exact, with no rejection sampling."""
    tris = []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            lo, hi = [-arm] * 3, [arm] * 3
            lo[axis], hi[axis] = (arm, 1.0) if sign > 0 else (-1.0, -arm)
            box = _box(tuple(lo), tuple(hi))
            inner = np.all(np.isclose(box[:, :, axis], sign * arm), axis=1)
            tris.append(box[~inner])
    return np.concatenate(tris)


def _polyhedron(vertices: np.ndarray) -> np.ndarray:
    """(T, 3, 3) triangles of the convex hull of a few vertices (brute force: fine for <= 8 points)."""
    n, tris = len(vertices), []
    for i in range(n):
        for j in range(i + 1, n):
            for k in range(j + 1, n):
                normal = np.cross(vertices[j] - vertices[i], vertices[k] - vertices[i])
                if np.linalg.norm(normal) < 1e-9:
                    continue
                side = (vertices - vertices[i]) @ normal
                if np.all(side <= 1e-9) or np.all(side >= -1e-9):
                    tris.append(vertices[[i, j, k]])
    return np.array(tris)


@functools.cache
def _mesh(shape: str) -> tuple[np.ndarray, np.ndarray]:
    """A unit-radius triangle mesh (T, 3, 3) of a shape's solid and its (T,) cumulative areas."""
    if shape == "square":
        tris = _box((-0.85,) * 3, (0.85,) * 3)
    elif shape == "triangle":  # regular tetrahedron with its apex up, circumradius 1.1
        ring = [2 * math.pi * i / 3 for i in range(3)]
        base = [(math.sqrt(8) / 3 * math.cos(a), -1 / 3, math.sqrt(8) / 3 * math.sin(a)) for a in ring]
        tris = _polyhedron(1.1 * np.array([(0.0, 1.0, 0.0), *base]))
    elif shape == "diamond":  # regular octahedron
        tris = _polyhedron(1.15 * np.concatenate([np.eye(3), -np.eye(3)]))
    elif shape == "cross":  # arms as thick as the image's cross
        tris = _plus(0.32)
    else:
        raise ValueError(f"no mesh for shape '{shape}'")
    areas = 0.5 * np.linalg.norm(np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]), axis=1)
    tris.flags.writeable = False
    return tris, np.cumsum(areas)


def sample_surface(shape: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) points uniform on the surface of the unit-radius solid of `shape`."""
    if shape == "circle":
        p = rng.standard_normal((n, 3))
        return p / np.linalg.norm(p, axis=1, keepdims=True)
    tris, cum_area = _mesh(shape)
    idx = np.searchsorted(cum_area, rng.random(n) * cum_area[-1], side="right")  # triangles by area
    idx = np.minimum(idx, len(tris) - 1)
    u, v = rng.random((2, n, 1))
    flip = (u + v) > 1  # fold the unit square onto the triangle: uniform barycentric coordinates
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    t = tris[idx]  # (n, 3, 3)
    return t[:, 0] + u * (t[:, 1] - t[:, 0]) + v * (t[:, 2] - t[:, 0])


def render_points(
    attrs: HasAttributes, rgb: tuple[int, int, int], rng: np.random.Generator, num_points: int = 1024
) -> np.ndarray:
    """(num_points, 6) float32: xyz then RGB in [0, 1]; y is up, the object sits near its position."""
    radius = SIZE_RADIUS[attrs.size] * rng.uniform(0.9, 1.1)
    xyz = sample_surface(attrs.shape, num_points, rng) * radius  # (N, 3)
    angle = rng.uniform(0, 2 * math.pi)  # turn about the vertical (y) axis
    c, s = math.cos(angle), math.sin(angle)
    xyz = xyz @ np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])
    cx, cy = POSITION_XY[attrs.position]
    xyz = xyz + np.array([cx, cy, 0.0]) + rng.uniform(-0.24, 0.24, size=3)
    xyz = xyz + rng.normal(0.0, 0.02, size=xyz.shape)
    color = (np.array(rgb, float) + rng.uniform(-18, 18, size=3)) / 255.0
    colors = color + rng.normal(0.0, 0.04, size=xyz.shape)  # (N, 3)
    clutter = rng.random(num_points) < CLUTTER_FRACTION
    k = int(clutter.sum())
    xyz[clutter] = rng.uniform(-2.2, 2.2, size=(k, 3))
    colors[clutter] = rng.uniform(0.2, 0.8, size=(k, 1))  # grey
    return np.concatenate([xyz, np.clip(colors, 0.0, 1.0)], axis=1).astype(np.float32)


# ------------------------------------------------------------------------------------------- audio

# A fourth apart (ratio ~1.335), so a +-3% jitter never brings two colours within a semitone.
BASE_FREQUENCY = {
    "red": 220.0,
    "green": 293.7,
    "blue": 392.0,
    "yellow": 523.3,
    "purple": 698.5,
    "orange": 932.3,
}
LOUDNESS = {"small": 0.07, "large": 0.35}  # RMS-equivalent amplitude while sounding: 14 dB apart
MAX_PARTIALS = 12


def partials(shape: str) -> tuple[np.ndarray, np.ndarray]:
    """(frequency ratios, amplitudes) of a shape's timbre; the fundamental is always the loudest."""
    k = np.arange(1, MAX_PARTIALS + 1, dtype=float)
    if shape == "circle":  # pure tone
        return k[:1], np.ones(1)
    if shape == "square":  # odd harmonics, 1/k: hollow, clarinet-like
        odd = k[k % 2 == 1]
        return odd, 1 / odd
    if shape == "triangle":  # all harmonics, 1/k^2: soft
        return k, 1 / k**2
    if shape == "diamond":  # all harmonics, 1/k: bright, sawtooth-like
        return k, 1 / k
    if shape == "cross":  # inharmonic partials: bell-like
        return np.array([1.0, 2.76, 5.40, 8.93]), np.array([1.0, 0.5, 0.3, 0.2])
    raise ValueError(f"no timbre for shape '{shape}'")


def _envelope(position: str, t: np.ndarray, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """(T,) gain in [0, 1]: when and how the note sounds, by position, with 10 ms cosine ramps."""
    if position in ("top", "bottom"):  # a short note, early or late
        start = (0.05 if position == "top" else 0.5) * seconds + rng.uniform(-0.04, 0.04) * seconds
        stop = start + 0.45 * seconds
    else:  # a long note that swells (left) or fades (right)
        start, stop = rng.uniform(0.0, 0.04) * seconds, seconds * rng.uniform(0.96, 1.0)
    ramp = 0.01
    gain = np.clip(np.minimum(t - start, stop - t) / ramp, 0.0, 1.0)
    gain = 0.5 - 0.5 * np.cos(math.pi * gain)
    if position in ("left", "right"):
        slope = np.clip((t - start) / max(stop - start, 1e-6), 0.0, 1.0)
        gain = gain * (0.1 + 0.9 * (slope if position == "left" else 1.0 - slope))
    return gain


@functools.cache
def _time_axis(n: int, sample_rate: int) -> np.ndarray:
    t = np.arange(n, dtype=np.float32) / np.float32(sample_rate)
    t.flags.writeable = False
    return t


def render_audio(
    attrs: HasAttributes, rng: np.random.Generator, sample_rate: int = 16000, seconds: float = 1.0
) -> np.ndarray:
    """(round(seconds * sample_rate),) float32 waveform in [-1, 1]."""
    n = int(round(seconds * sample_rate))
    t = _time_axis(n, sample_rate)  # (T,) float32
    f0 = BASE_FREQUENCY[attrs.color] * rng.uniform(0.97, 1.03)
    ratios, amps = partials(attrs.shape)
    keep = ratios * f0 < 0.45 * sample_rate  # nothing above Nyquist: no aliasing
    ratios, amps = ratios[keep], amps[keep] * rng.uniform(0.8, 1.2, size=int(keep.sum()))
    amps = amps / np.sqrt(np.sum(amps**2))  # the same power for every timbre: loudness is size alone
    phases = rng.uniform(0, 2 * math.pi, size=len(ratios))
    # float32 throughout: several times faster than float64, and the phase error (< 0.01 rad) is inaudible.
    arg = np.outer((2 * math.pi * f0 * ratios).astype(np.float32), t)  # (P, T)
    arg += phases.astype(np.float32)[:, None]
    tone = amps.astype(np.float32) @ np.sin(arg, out=arg)  # (T,)
    level = LOUDNESS[attrs.size] * math.sqrt(2) * rng.uniform(0.85, 1.15)
    wave = np.float32(level) * _envelope(attrs.position, t, seconds, rng) * tone
    hum_freq, hum_phase = rng.choice([50.0, 60.0]), rng.uniform(0, 2 * math.pi)
    hum_level = rng.uniform(0, 0.02)
    wave += np.float32(hum_level) * np.sin(np.float32(2 * math.pi * hum_freq) * t + np.float32(hum_phase))
    wave += np.float32(rng.uniform(0.003, 0.02)) * rng.standard_normal(n, dtype=np.float32)
    return np.clip(wave, -1.0, 1.0)


# ----------------------------------------------------------------------------------------- tabular

TABULAR_NUMERIC = ["hue", "area", "x", "y", "edges", "tilt"]
TABULAR_CATEGORICAL = {"tone": ["warm", "cool"], "region": ["upper", "middle", "lower"]}
EDGES = {"circle": 1, "triangle": 3, "square": 4, "diamond": 4, "cross": 12}
TILT = {"triangle": 0.0, "square": 0.0, "diamond": 45.0, "cross": 0.0}  # degrees; a circle has none
WARM = {"red", "orange", "yellow"}
REGION = {"top": "upper", "bottom": "lower", "left": "middle", "right": "middle"}
MISSING_PROB = 0.05  # each field is absent from a record with this chance
FLIP_PROB = 0.1  # categorical label noise


def hue_degrees(rgb: tuple[int, int, int]) -> float:
    return 360.0 * colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))[0]


def render_tabular(
    attrs: HasAttributes, rgb: tuple[int, int, int], rng: np.random.Generator
) -> dict[str, Any]:
    """A record {field: value}: floats and ints for TABULAR_NUMERIC, strings for TABULAR_CATEGORICAL."""
    radius = SIZE_RADIUS[attrs.size] * rng.uniform(0.9, 1.1)
    cx, cy = POSITION_XY[attrs.position]
    edges = EDGES[attrs.shape] + (int(rng.choice([-1, 1])) if rng.random() < FLIP_PROB else 0)
    any_tilt = rng.uniform(0.0, 90.0)  # drawn for every shape, so the stream does not depend on it
    tilt = TILT.get(attrs.shape, any_tilt) + rng.normal(0.0, 4.0)
    record: dict[str, Any] = {
        "hue": round(float(hue_degrees(rgb) + rng.normal(0.0, 8.0)), 2),  # not wrapped: red may be < 0
        "area": round(float(math.pi * radius**2 * math.exp(rng.normal(0.0, 0.15))), 4),
        "x": round(float(cx + rng.normal(0.0, 0.15)), 3),
        "y": round(float(cy + rng.normal(0.0, 0.15)), 3),
        "edges": max(edges, 1),
        "tilt": round(float(tilt), 1),
    }
    tone = "warm" if attrs.color in WARM else "cool"
    region = REGION[attrs.position]
    if rng.random() < FLIP_PROB:
        tone = "cool" if tone == "warm" else "warm"
    if rng.random() < FLIP_PROB:
        region = str(rng.choice([r for r in TABULAR_CATEGORICAL["region"] if r != region]))
    record.update(tone=tone, region=region)
    missing = rng.random(len(record)) < MISSING_PROB
    return {k: v for (k, v), gone in zip(record.items(), missing, strict=True) if not gone}
