"""Point-cloud transform: decode (array, `.npy` or `.ply` path, or their bytes) to (num_points, 3 + C).

Columns are xyz then `channels` extra values per point (RGB for the world and for coloured PLY
files). A cloud with more extra columns keeps the first `channels`; one with fewer is a bad sample,
since zero-filled colours would silently teach the model that the object is black.

Sampling: training draws `num_points` points at random (every point once, then repeats, when the
cloud is smaller); evaluation is deterministic: evenly spaced indices (`even`, cheap; fine for the
shuffled clouds that scanners and mesh samplers produce) or farthest-point sampling (`fps`, O(N * K),
even coverage for clouds stored in scan order). `normalize` centres the cloud and scales it into the
unit sphere; it is off by default so that an object's size and position stay visible. Training adds
a random rotation about the vertical axis (`up_axis`) and Gaussian jitter of xyz.

The PLY reader handles `ascii`, `binary_little_endian` and `binary_big_endian` files with a `vertex`
element holding x, y, z and optionally red, green, blue (integer colours are divided by their type's
maximum, 255 for uchar); other elements and properties are passed over.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydantic
import torch

from coalign.data.sources.base import SampleError
from coalign.data.transforms.base import Transform
from coalign.registry import TRANSFORMS, StrictModel

POINT_EXTENSIONS = (".npy", ".ply")
PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip
PLY_FORMATS = {"ascii": "", "binary_little_endian": "<", "binary_big_endian": ">"}
AXES = {"x": 0, "y": 1, "z": 2}


class PointsConfig(StrictModel):
    num_points: int = pydantic.Field(1024, ge=1)
    channels: int = pydantic.Field(3, ge=0)  # values per point after xyz (3 for RGB)
    normalize: bool = False  # centre + unit sphere (loses size and position)
    up_axis: Literal["x", "y", "z"] = "y"  # the vertical axis, for training rotations
    rotate: bool = True  # training only: random rotation about up_axis
    jitter: float = pydantic.Field(0.01, ge=0.0)  # training only: std of Gaussian noise on xyz
    eval_sampling: Literal["even", "fps"] = "even"

    @classmethod
    def tiny(cls) -> dict:
        return {"num_points": 128}


# ------------------------------------------------------------------------------------------- PLY


class _PlyError(ValueError):
    pass


def _ply_header(data: bytes) -> tuple[str, list[tuple[str, int, list[tuple[str, str | None]]]], int]:
    """(format, [(element, count, [(property, type or None for lists)])], body offset)."""
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise _PlyError("not a PLY file (no 'ply' magic or no 'end_header')")
    body = data.index(b"\n", end) + 1 if b"\n" in data[end:] else len(data)
    fmt, elements = None, []
    for line in data[:end].decode("ascii", errors="replace").splitlines()[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format" and len(words) >= 2:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3:
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements and len(words) == 3:
            if words[1] not in PLY_TYPES:
                raise _PlyError(f"unknown property type '{words[1]}'")
            elements[-1][2].append((words[2], words[1]))
        elif words[0] == "property" and elements and len(words) == 5 and words[1] == "list":
            elements[-1][2].append((words[4], None))
        else:
            raise _PlyError(f"cannot parse header line '{line.strip()}'")
    if fmt not in PLY_FORMATS:
        raise _PlyError(f"format '{fmt}' is not supported; valid: {', '.join(PLY_FORMATS)}")
    return fmt, elements, body


def read_ply(data: bytes) -> np.ndarray:
    """(N, 3) or (N, 6) float32: xyz, then RGB in [0, 1] when the vertices carry red, green, blue."""
    fmt, elements, offset = _ply_header(data)
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise _PlyError("no 'vertex' element")
    at = names.index("vertex")
    count, props = elements[at][1], elements[at][2]
    if any(t is None for _, t in props):
        raise _PlyError("list properties in the vertex element are not supported")
    if fmt == "ascii":
        lines = data[offset:].decode("ascii", errors="replace").splitlines()
        skip = sum(e[1] for e in elements[:at])  # one line per item of the elements before
        rows = lines[skip : skip + count]
        if len(rows) < count:
            raise _PlyError(f"{count} vertices declared, {len(rows)} found")
        values = np.array(" ".join(rows).split(), dtype=np.float64)
        if values.size != count * len(props):
            raise _PlyError(f"vertex rows do not have {len(props)} values each")
        table = values.reshape(count, len(props))
        columns = {name: table[:, i] for i, (name, _) in enumerate(props)}
        types = dict(props)
    else:
        order = PLY_FORMATS[fmt]
        for name, n, before in elements[:at]:
            if any(t is None for _, t in before):
                raise _PlyError(f"binary element '{name}' with list properties precedes the vertices")
            offset += n * np.dtype([(p, order + PLY_TYPES[t]) for p, t in before]).itemsize
        dtype = np.dtype([(name, order + PLY_TYPES[t]) for name, t in props])
        if len(data) - offset < count * dtype.itemsize:
            raise _PlyError(f"truncated: {count} vertices declared, the file is too short")
        table = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        columns = {name: table[name] for name, _ in props}
        types = dict(props)
    if not {"x", "y", "z"} <= columns.keys():
        raise _PlyError(f"vertices need x, y, z; found {', '.join(columns)}")
    out = [columns[a].astype(np.float32) for a in "xyz"]
    if {"red", "green", "blue"} <= columns.keys():
        for c in ("red", "green", "blue"):
            kind = np.dtype(PLY_TYPES[types[c]])
            scale = float(np.iinfo(kind).max) if kind.kind in "iu" else 1.0
            out.append((columns[c].astype(np.float64) / scale).astype(np.float32))
    return np.stack(out, axis=1)


# ---------------------------------------------------------------------------------------- decoding


def _read_points_bytes(data: bytes, where: str) -> np.ndarray:
    try:
        if data.startswith(b"ply"):
            return read_ply(data)
        if data.startswith(b"\x93NUMPY"):
            return np.load(io.BytesIO(data), allow_pickle=False)
    except (_PlyError, ValueError, OSError, EOFError, UnicodeError) as err:
        raise SampleError("corrupt_points", f"{where}: {err}") from None
    raise SampleError("corrupt_points", f"{where}: neither a PLY file nor a .npy array")


def decode_points(value: Any) -> np.ndarray:
    """(N, 3 + C) float32 from an array, tensor, list, `.npy` / `.ply` path or their bytes."""
    if isinstance(value, str | Path):
        path = Path(value)
        if not path.is_file():
            raise SampleError("missing_points", str(value))
        if path.suffix.lower() not in POINT_EXTENSIONS:
            raise SampleError(
                "corrupt_points", f"{value}: unsupported extension; valid: {', '.join(POINT_EXTENSIONS)}"
            )
        try:
            data = path.read_bytes()
        except OSError as err:
            raise SampleError("corrupt_points", f"{value}: {err}") from None
        value = _read_points_bytes(data, str(value)[:200])
    elif isinstance(value, bytes | bytearray):
        value = _read_points_bytes(bytes(value), "bytes")
    elif isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        points = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError) as err:
        raise SampleError("corrupt_points", f"not a cloud ({type(value).__name__}): {err}") from None
    if points.ndim != 2 or points.shape[1] < 3 or len(points) == 0:
        raise SampleError("corrupt_points", f"array of shape {points.shape} is not an (N, 3 + C) cloud")
    if not np.isfinite(points).all():
        raise SampleError("corrupt_points", "cloud has NaN or infinite values")
    return points


def farthest_point_indices(xyz: np.ndarray, k: int) -> np.ndarray:
    """(k,) indices of farthest-point sampling, starting from the point farthest from the centroid
    (so the result does not depend on the order of the points)."""
    first = int(np.argmax(np.sum((xyz - xyz.mean(0)) ** 2, axis=1)))
    picked = np.empty(k, dtype=np.int64)
    picked[0] = first
    dist = np.sum((xyz - xyz[first]) ** 2, axis=1)  # (N,) squared distance to the picked set
    for i in range(1, k):
        picked[i] = int(np.argmax(dist))
        dist = np.minimum(dist, np.sum((xyz - xyz[picked[i]]) ** 2, axis=1))
    return picked


@TRANSFORMS.register("points")
class PointsTransform(Transform):
    Config = PointsConfig
    modality = "points"
    shared_with_views = ("num_points", "channels", "normalize")

    def __init__(self, cfg: PointsConfig | None = None, **kwargs):
        self.cfg = cfg or PointsConfig(**kwargs)

    def __call__(self, value: Any, rng: np.random.Generator) -> torch.Tensor:
        points = decode_points(value)
        extra, want = points.shape[1] - 3, self.cfg.channels
        if extra < want:
            raise SampleError("corrupt_points", f"{extra} values per point after xyz; expected {want}")
        points = points[:, : 3 + self.cfg.channels].copy()
        if self.cfg.normalize:
            centred = points[:, :3] - points[:, :3].mean(0)
            points[:, :3] = centred / max(float(np.sqrt((centred**2).sum(1).max())), 1e-12)
        points = points[self._indices(points, rng)]  # (num_points, 3 + C)
        if self.train:
            self._augment(points, rng)
        return torch.from_numpy(points)

    def _indices(self, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n, k = len(points), self.cfg.num_points
        if self.train:
            if n >= k:
                return rng.choice(n, size=k, replace=False)
            return np.concatenate([rng.permutation(n), rng.integers(0, n, size=k - n)])
        if n < k:
            return np.arange(k) % n  # every point, then repeats in order
        if self.cfg.eval_sampling == "fps":
            return farthest_point_indices(points[:, :3], k)
        return (np.arange(k) * n) // k  # evenly spaced

    def _augment(self, points: np.ndarray, rng: np.random.Generator) -> None:
        """In place: rotate xyz about the up axis, then jitter."""
        if self.cfg.rotate:
            a, b = (i for i in range(3) if i != AXES[self.cfg.up_axis])
            angle = rng.uniform(0, 2 * math.pi)
            c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
            pa, pb = points[:, a].copy(), points[:, b].copy()
            points[:, a], points[:, b] = c * pa - s * pb, s * pa + c * pb
        if self.cfg.jitter > 0:
            points[:, :3] += rng.normal(0.0, self.cfg.jitter, size=(len(points), 3)).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {"num_points": self.cfg.num_points, "channels": self.cfg.channels}
