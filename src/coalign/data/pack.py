"""Pack any source into WebDataset tar shards (`coalign data pack`), and describe shards (`data stat`).

Each usable sample of the source becomes one key (its source index, `%06d`) with one member per
modality (the format is in `data/shards.py`). Every sample is checked before it is packed, with the
same decoders training uses: an image, audio clip or point cloud that does not decode, a missing
file, a sample without a usable caption, a row the source cannot read, are skipped and counted by
reason with their source index (in the manifest and in the summary), never packed. Files that
decode are packed as they are (a JPEG stays byte-for-byte the same JPEG); in-memory arrays are
encoded losslessly (images as PNG, waveforms as 32-bit float WAV, point clouds as .npy).

Checking decodes every image, so packing runs on `workers` processes (a DataLoader over source
indices, in order); the main process only writes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from coalign.data.remote import display_name, is_remote
from coalign.data.sample import captions
from coalign.data.shards import (
    AUDIO_EXTENSIONS,
    IMAGE_EXTENSIONS,
    KEY,
    MANIFEST,
    POINTS_EXTENSIONS,
    ShardWriter,
    file_sha256,
    json_bytes,
    to_buffer,
)
from coalign.data.sources.base import SampleError, SkipCounter, Source
from coalign.data.sources.webdataset import WebDatasetSource
from coalign.data.transforms.audio import decode_audio, read_audio_file
from coalign.data.transforms.image import decode_image
from coalign.data.transforms.points import decode_points
from coalign.io import atomic_write_json

EXTENSION_ALIASES = {"jpeg": "jpg"}
STATE = "pack_state.json"  # an unfinished pack's record of its durable shards (see `pack`)
SHARD_KEYS = ("name", "samples", "bytes", "sha256")
META = ("id", "label")


def _suffix(path: str) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    return EXTENSION_ALIASES.get(ext, ext)


def _image(value: Any) -> tuple[str, bytes]:
    image = decode_image(value)  # SampleError when it does not decode: never packed
    if isinstance(value, str | Path) and _suffix(str(value)) in IMAGE_EXTENSIONS:
        return _suffix(str(value)), Path(value).read_bytes()
    if isinstance(value, bytes | bytearray):
        with Image.open(io.BytesIO(value)) as im:
            ext = EXTENSION_ALIASES.get((im.format or "").lower(), (im.format or "").lower())
        if ext in IMAGE_EXTENSIONS:
            return ext, bytes(value)
    return "png", to_buffer(lambda buf: image.save(buf, format="PNG"))


def _audio(value: Any, rate: int) -> tuple[str, bytes]:
    import soundfile

    if isinstance(value, str | Path | bytes | bytearray):
        read_audio_file(value)  # SampleError when it does not decode
        if isinstance(value, bytes | bytearray):
            return "wav", bytes(value)  # soundfile sniffs the container; the extension is nominal
        ext = _suffix(str(value))
        if ext in AUDIO_EXTENSIONS:
            return ext, Path(value).read_bytes()
        value = read_audio_file(value)[0]
    wave = decode_audio(value, rate)  # (T,) float32: an array is taken to be at `rate`
    return "wav", to_buffer(lambda buf: soundfile.write(buf, wave, rate, format="WAV", subtype="FLOAT"))


def _points(value: Any) -> tuple[str, bytes]:
    cloud = decode_points(value)  # SampleError when it does not decode
    if isinstance(value, str | Path) and _suffix(str(value)) in POINTS_EXTENSIONS:
        return _suffix(str(value)), Path(value).read_bytes()
    return "npy", to_buffer(lambda buf: np.save(buf, cloud, allow_pickle=False))


def _other(modality: str, value: Any) -> tuple[str, bytes]:
    """A modality without a decoder of its own: a file's bytes, raw bytes, or an array as .npy."""
    if isinstance(value, str | Path):
        if not Path(value).is_file():
            raise SampleError(f"missing_{modality}", str(value))
        return f"{modality}.{_suffix(str(value)) or 'bin'}", Path(value).read_bytes()
    if isinstance(value, bytes | bytearray):
        return f"{modality}.bin", bytes(value)
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        array = np.asarray(None)
    if array.dtype == object:
        raise SampleError(f"corrupt_{modality}", f"cannot pack a {type(value).__name__}")
    return f"{modality}.npy", to_buffer(lambda buf: np.save(buf, array, allow_pickle=False))


def encode_sample(sample: dict[str, Any], audio_rate: int = 16000) -> dict[str, bytes]:
    """The members of one sample, {extension: bytes}; SampleError when a modality does not decode."""
    members: dict[str, bytes] = {}
    meta: dict[str, Any] = {"id": str(sample.get("id", "")), "label": dict(sample.get("label") or {})}
    for key, value in sample.items():
        if key in META or value is None:
            continue
        if key == "text":
            found = captions(value)
            if not found:
                raise SampleError("empty_caption", "no usable caption")
            members["txt"] = found[0].encode("utf-8")
            if len(found) > 1:
                meta["captions"] = found
        elif key == "tabular":
            meta["tabular"] = value
        elif key == "image":
            ext, data = _image(value)
            members[ext] = data
        elif key == "audio":
            ext, data = _audio(value, audio_rate)
            members[ext] = data
        elif key == "points":
            ext, data = _points(value)
            members[ext] = data
        else:
            ext, data = _other(key, value)
            members[ext] = data
    members["json"] = json_bytes(meta)
    return members


class _Encoded(torch.utils.data.Dataset):
    """Item p: (i, members, its modalities) for the usable sample i = indices[p], (i, (reason,
    detail), []) for one that is skipped."""

    def __init__(self, source: Source, audio_rate: int, indices: Sequence[int] | None = None):
        self.source, self.audio_rate = source, audio_rate
        self.indices = range(len(source)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, Any, list[str]]:
        index = int(self.indices[position])
        try:
            sample = self.source[index]
            members = encode_sample(sample, self.audio_rate)
        except SampleError as err:
            return index, (err.reason, err.detail), []
        return index, members, [k for k, v in sample.items() if k not in META and v is not None]


def pack(
    source: Source,
    out: Path,
    shard_size: int | None = 10_000,
    max_shard_bytes: int | None = None,
    workers: int = 0,
    audio_rate: int = 16000,
    progress: bool = True,
    spec: dict[str, Any] | None = None,
    indices: Sequence[int] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `source` (only the samples `indices`, in that order, when given: keys stay source
    indices) as shards into the new or empty folder `out`, or continue an interrupted pack of the
    same source into `out`; return the manifest written, which carries `extra` too.

    Resume: after each shard is durable, OUT/pack_state.json records it (name, bytes, SHA-256, the
    position where it ends, the skips and coverage up to there). A pack started again on that
    folder with the same settings keeps the shards that still match their record, redoes the
    first that does not (a shard cut by the kill is only ever a hidden temporary file) and every
    one after it, and gives the same bytes as an uninterrupted pack."""
    out = Path(out)
    positions = range(len(source)) if indices is None else [int(i) for i in indices]
    identity = {
        "source": spec or {},
        "source_samples": len(source),
        "indices": None if indices is None else _digest(positions),
        "shard_size": shard_size,
        "max_shard_bytes": max_shard_bytes,
        "audio_rate": audio_rate,
    }
    done = _resume(out, identity)
    start = done[-1]["end"] if done else 0
    skipped = SkipCounter.from_record(done[-1]["skipped"]) if done else SkipCounter()
    coverage: Counter[str] = Counter(done[-1]["coverage"] if done else {})
    position = start  # of the sample being written: where a shard that closes now ends
    records = list(done)

    def closed(entry: dict[str, Any]) -> None:
        end = len(positions) if position is None else position
        records.append({**entry, "end": end, "skipped": skipped.record(), "coverage": dict(coverage)})
        atomic_write_json(out / STATE, {**identity, "shards": records})

    writer = ShardWriter(
        out, shard_size, max_shard_bytes, done=[{k: d[k] for k in SHARD_KEYS} for d in done], on_close=closed
    )
    started = time.perf_counter()
    loader = torch.utils.data.DataLoader(
        _Encoded(source, audio_rate, positions[start:]),
        batch_size=None,
        num_workers=workers,
        collate_fn=_identity,
    )
    bar = tqdm(
        total=len(positions),
        initial=start,
        desc="packing",
        unit="sample",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for offset, (index, members, modalities) in enumerate(loader):
            position = start + offset
            if isinstance(members, tuple):
                skipped.skip(members[0], index)
            else:
                writer.write(KEY.format(index), members)
                coverage.update(modalities)
            bar.update(1)
            bar.set_postfix(shards=len(writer.shards) + 1, skipped=sum(skipped.values()), refresh=False)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    position = None  # the last shard ends at the end
    tasks = source.zero_shot_tasks()
    zero_shot = {k: {"classnames": t.classnames, "templates": t.templates} for k, t in tasks.items()}
    manifest = writer.close(
        {
            "source": spec or {},
            "source_samples": len(source),
            "modalities": dict(sorted(coverage.items())),
            "skipped": skipped.record(),
            "zero_shot": zero_shot,
            "seconds": round(time.perf_counter() - started, 3),
            "resumed_shards": len(done),
            **(extra or {}),
        }
    )
    (out / STATE).unlink(missing_ok=True)  # the manifest, written last, now says the set is whole
    return manifest


def _digest(positions: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(positions, dtype=np.int64).tobytes()).hexdigest()


def _resume(out: Path, identity: dict[str, Any]) -> list[dict[str, Any]]:
    """The verified shards of an interrupted pack in `out` ([] for a new or empty folder); refuse a
    folder that holds anything else, a finished pack, or a pack of something else."""
    state_path = out / STATE
    if not state_path.exists():
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(
                f"'{out}' exists and is not an empty folder; shards go into a new or empty one"
            )
        out.mkdir(parents=True, exist_ok=True)
        return []
    if (out / MANIFEST).exists():
        raise FileExistsError(f"'{out}' holds a finished pack (manifest.json); choose a new or empty OUT")
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError) as err:
        raise FileExistsError(f"'{state_path}' cannot be read ({err}); delete OUT to start over") from None
    for key, value in identity.items():
        if state.get(key) != value:
            raise FileExistsError(
                f"'{out}' holds an interrupted pack of something else ({key}: {state.get(key)!r} there, "
                f"{value!r} now); choose another OUT, or delete it to start over"
            )
    done = []
    for entry in state.get("shards", []):
        path = out / entry["name"]
        if (
            not path.is_file()
            or path.stat().st_size != entry["bytes"]
            or file_sha256(path) != entry["sha256"]
        ):
            break  # this shard and every one after it are written again
        done.append(entry)
    for stale in out.glob(".*.tmp"):  # a shard being written when the pack was killed
        stale.unlink()
    return done


def _identity(x: Any) -> Any:
    return x


def parse_bytes(text: str) -> int:
    """'500000', '64K', '256M', '1.5G' (powers of 1024) -> bytes."""
    units = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    s = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = s[-1] if s and s[-1] in units else ""
    try:
        value = float(s[: len(s) - len(unit)])
    except ValueError:
        raise ValueError(f"'{text}' is not a size in bytes (e.g. 500000, 64K, 256M, 1G)") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"'{text}' is not a positive size")
    return int(value * units[unit])


# ---------------------------------------------------------------------------------------------- stat


def _summary(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "min": ordered[0],
        "mean": round(statistics.fmean(ordered), 2),
        "median": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)],
        "max": ordered[-1],
    }


def stat(path: str | list[str], on_sample: Callable[[], None] | None = None) -> dict[str, Any]:
    """Counts, modality coverage and caption lengths of shards, read through the webdataset source
    (so what it counts as unreadable is what training would skip)."""
    source = WebDatasetSource(path=path, required=[])
    coverage: Counter[str] = Counter()
    labels: set[str] = set()
    unreadable = SkipCounter()
    words: list[int] = []
    chars: list[int] = []
    per_caption: list[int] = []
    for index in range(len(source)):
        try:
            sample = source[index]
        except SampleError as err:
            unreadable.skip(err.reason, index)
            continue
        finally:
            if on_sample is not None:
                on_sample()
        coverage.update(k for k, v in sample.items() if k not in META and v is not None)
        labels |= set(sample["label"])
        texts = captions(sample.get("text"))
        per_caption.append(len(texts))
        for t in texts:
            words.append(len(t.split()))
            chars.append(len(t))
    readable = len(source) - sum(unreadable.values())
    manifest = source.manifest
    listed = {s["name"]: s["bytes"] for s in manifest.get("shards", [])}
    size = sum(
        listed.get(display_name(p), 0) if is_remote(p) else Path(p).stat().st_size for p in source.paths
    )
    return {
        "shards": len(source.paths),
        "samples": len(source),
        "readable": readable,
        "unreadable": unreadable.record(),
        "modalities": {
            m: {"samples": n, "fraction": round(n / max(readable, 1), 4)} for m, n in sorted(coverage.items())
        },
        "captions": {"per_sample": _summary(per_caption), "words": _summary(words), "chars": _summary(chars)},
        "bytes": size,
        "manifest": source.manifest_location,
        "skipped_when_packed": (manifest.get("skipped") or {}).get("counts", {}),
        "labels": sorted(labels),
    }
