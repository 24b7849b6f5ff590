"""The WebDataset shard format as coalign writes and reads it: member names, the manifest, the tar
index, and a writer that rolls shards over by sample count or by bytes.

A shard is a plain (uncompressed) tar. A sample is the run of consecutive members sharing one key,
the member name up to its first dot (`000123.png`, `000123.txt`, `000123.json`), which is the
grouping rule of the `webdataset` package (`tariterators.base_plus_ext`), so OpenCLIP and webdataset
read coalign's shards and coalign reads theirs. The extension says what a member holds:

    jpg jpeg png webp bmp gif -> image      txt -> text (the first caption, UTF-8)
    wav flac ogg mp3          -> audio      npy ply -> points
    json -> {"id", "label": {name: int}, "captions": [...] (when there are several), "tabular": {...}}
    cls  -> label "class" (webdataset's integer class convention)
    <modality>.<ext>          -> any other modality, as the raw bytes of that file (`000123.depth.npy`)

Uncompressed, because a reader then finds member `k` of a shard by seeking: `scan_shard` reads only
the 512-byte headers (skipping the data) and keeps each member's offset and size.

The manifest (`manifest.json` beside the shards) names each shard with its sample count and bytes,
and carries what the packed source knew that samples alone do not (zero-shot class names, the skips
made while packing, modality coverage).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from webdataset import TarWriter

from coalign.io import atomic_write_json, fsync_dir

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "coalign-shards"
SHARD_NAME = "{:06d}.tar"
KEY = "{:06d}"

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "mp3")
POINTS_EXTENSIONS = ("npy", "ply")
MODALITY_OF = (
    {e: "image" for e in IMAGE_EXTENSIONS}
    | {"txt": "text"}
    | {e: "audio" for e in AUDIO_EXTENSIONS}
    | {e: "points" for e in POINTS_EXTENSIONS}
)
META_EXTENSIONS = ("json", "cls")

# tar layout: a 512-byte header per member, its data padded to 512; the end is two zero blocks, and
# tarfile pads the whole archive to a multiple of its 10240-byte record.
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE


def split_name(name: str) -> tuple[str | None, str | None]:
    """(key, extension) of a member name by webdataset's rule (`base_plus_ext`): the key runs to the
    first dot of the last path part, the extension is the rest (`a/000001.depth.npy` ->
    ('a/000001', 'depth.npy')). (None, None) for a name without a dot."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2)) if match else (None, None)


def modality_of(ext: str) -> str | None:
    """The sample key a member with this extension fills; None for metadata and unknown extensions."""
    ext = ext.lower()
    if ext in MODALITY_OF:
        return MODALITY_OF[ext]
    head, dot, _ = ext.partition(".")
    return head if dot and head not in ("id", "label") else None


def member_bytes(size: int) -> int:
    """Bytes one member takes in a tar: its header plus its data padded to whole blocks."""
    return BLOCK + -(-size // BLOCK) * BLOCK


def tar_bytes(members: int) -> int:
    """Bytes of a finished tar whose members take `members` bytes: end blocks, record padding."""
    return -(-(members + 2 * BLOCK) // RECORD) * RECORD


# ------------------------------------------------------------------------------------------ reading


@dataclass
class ShardIndex:
    """Where each sample of one shard lies: samples[k] = (key, ((ext, data offset, size), ...)).

    `truncated` holds the positions of samples the end of the file cut (their data, or the members
    after them, are missing); `error` says why a shard could not be read at all.
    """

    samples: list[tuple[str, tuple[tuple[str, int, int], ...]]] = field(default_factory=list)
    truncated: set[int] = field(default_factory=set)
    error: str | None = None
    reason: str = "corrupt_shard"  # the skip reason of every sample when `error` is set


def scan_shard(path: Path) -> ShardIndex:
    """Read the member headers of a tar (seeking over the data) and group members into samples."""
    index = ShardIndex()
    try:
        with tarfile.open(path, mode="r:") as tar:
            members, cut = _headers(tar, os.path.getsize(path))
    except (OSError, tarfile.TarError, EOFError) as err:
        index.error = f"cannot read the tar: {err}"
        return index
    for key, ext, offset, length in members:
        if not index.samples or index.samples[-1][0] != key:
            index.samples.append((key, ()))
        k, have = index.samples[-1]
        index.samples[-1] = (k, (*have, (ext, offset, length)))
    if cut and index.samples:
        index.truncated.add(len(index.samples) - 1)
    return index


def _headers(tar: tarfile.TarFile, size: int) -> tuple[list[tuple[str, str, int, int]], bool]:
    """[(key, ext, data offset, size)] of the regular files in `tar`, and whether the file ends early."""
    members = []
    while True:
        try:
            info = tar.next()
        except (tarfile.TarError, EOFError, OSError):  # a header cut short, or garbage past the end
            return members, True
        if info is None:
            return members, False
        if not info.isfile():
            continue
        if info.offset_data + info.size > size:
            return members, True
        key, ext = split_name(info.name)
        if key is not None:
            members.append((key, ext, info.offset_data, info.size))


def read_members(path: Path, members: tuple[tuple[str, int, int], ...]) -> dict[str, bytes]:
    """The data of one sample's members, read in one span (a sample's members sit next to each other)."""
    start = min(offset for _, offset, _ in members)
    end = max(offset + size for _, offset, size in members)
    with open(path, "rb") as f:
        f.seek(start)
        span = f.read(end - start)
    return {ext: span[offset - start : offset - start + size] for ext, offset, size in members}


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The shards' manifest in `folder`, or None when there is none (or it is not ours)."""
    try:
        return parse_manifest((Path(folder) / MANIFEST).read_bytes())
    except OSError:
        return None


def parse_manifest(data: bytes) -> dict[str, Any] | None:
    """A manifest's content, or None when it is not a coalign shard manifest."""
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) and value.get("format") == MANIFEST_FORMAT else None


# ------------------------------------------------------------------------------------------ writing


class ShardWriter:
    """Writes samples (dicts of extension -> bytes) into `folder/000000.tar`, `000001.tar`, ...

    A shard closes at `shard_size` samples, or before the sample that would take it past
    `max_shard_bytes` (a sample bigger than that gets a shard of its own). Members are written by
    `webdataset.TarWriter`, so names and order (`key.ext`, extensions sorted) are the ones webdataset
    writes; a fixed mtime and owner make the same input give the same bytes. Each shard is written
    under a hidden name, fsynced and renamed when complete, so a folder never holds half a shard
    under a shard's name; its entry carries the SHA-256 of its bytes, which a resumed pack checks.
    """

    def __init__(
        self,
        folder: Path,
        shard_size: int | None = None,
        max_shard_bytes: int | None = None,
        done: list[dict[str, Any]] | None = None,
        on_close: Callable[[dict[str, Any]], None] | None = None,
    ):
        if shard_size is not None and shard_size < 1:
            raise ValueError(f"shard size must be at least 1 sample, not {shard_size}")
        if max_shard_bytes is not None and max_shard_bytes < tar_bytes(member_bytes(0)):
            raise ValueError(f"max shard bytes must be at least {tar_bytes(member_bytes(0))}")
        self.folder = Path(folder)
        self.shard_size, self.max_shard_bytes = shard_size, max_shard_bytes
        # {"name", "samples", "bytes", "sha256"} of each finished shard; `done` continues a resumed pack
        self.shards: list[dict[str, Any]] = list(done or [])
        self.on_close = on_close  # called with each shard's entry once the shard is durable
        self._file: Any = None
        self._tar: Any = None
        self._count = 0
        self._members = 0  # bytes of the members written to the open shard

    def write(self, key: str, members: dict[str, bytes]) -> None:
        size = sum(member_bytes(len(v)) for v in members.values())
        if self._tar is not None and self._full(size):
            self._close()
        if self._tar is None:
            self._open()
        self._tar.write({"__key__": key, **members})
        self._count += 1
        self._members += size

    def _full(self, size: int) -> bool:
        if self.shard_size is not None and self._count >= self.shard_size:
            return True
        limit = self.max_shard_bytes
        return limit is not None and tar_bytes(self._members + size) > limit

    def _open(self) -> None:
        name = SHARD_NAME.format(len(self.shards))
        self._file = open(self.folder / f".{name}.tmp", "wb")  # noqa: SIM115 (closed by _close or abort)
        self._tar = TarWriter(self._file, encoder=False, mtime=0, user="coalign", group="coalign")
        self._count, self._members = 0, 0

    def _close(self) -> None:
        name = SHARD_NAME.format(len(self.shards))
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        tmp = self.folder / f".{name}.tmp"
        os.replace(tmp, self.folder / name)
        fsync_dir(self.folder)  # the rename is durable before anyone is told the shard is done
        size = (self.folder / name).stat().st_size
        entry = {
            "name": name,
            "samples": self._count,
            "bytes": size,
            "sha256": file_sha256(self.folder / name),
        }
        self.shards.append(entry)
        self._tar = self._file = None
        if self.on_close is not None:
            self.on_close(entry)

    def close(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Finish the open shard, then write the manifest (last: its presence means the set is whole)."""
        if self._tar is not None:
            self._close()
        fsync_dir(self.folder)
        record = {
            "format": MANIFEST_FORMAT,
            "version": 1,
            "samples": sum(s["samples"] for s in self.shards),
            "bytes": sum(s["bytes"] for s in self.shards),
            "shards": self.shards,
            **manifest,
        }
        atomic_write_json(self.folder / MANIFEST, record)
        return record

    def abort(self) -> None:
        """Drop the shard being written (an interrupted pack leaves no half shard behind)."""
        if self._tar is not None:
            # finish the tar (its end blocks) so that nothing writes to it later, then drop it
            with contextlib.suppress(OSError, ValueError):
                self._tar.close()
            self._file.close()
            (self.folder / f".{SHARD_NAME.format(len(self.shards))}.tmp").unlink(missing_ok=True)
            self._tar = self._file = None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def json_bytes(value: Any) -> bytes:
    """UTF-8 JSON of a metadata record (numpy scalars and arrays become numbers and lists)."""

    def plain(v: Any) -> Any:
        if hasattr(v, "tolist"):
            return v.tolist()
        raise TypeError(f"{type(v).__name__} is not JSON serialisable")

    return json.dumps(value, ensure_ascii=False, default=plain, sort_keys=True).encode("utf-8")


def to_buffer(write: Any) -> bytes:
    """The bytes a writer function (`np.save`, `soundfile.write`, `Image.save`) puts into a file."""
    buf = io.BytesIO()
    write(buf)
    return buf.getvalue()
