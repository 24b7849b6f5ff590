"""WebDataset tar shards (`coalign data pack` writes them; OpenCLIP's and webdataset's read too).

`path` is a folder of `*.tar` shards, one tar, a brace pattern (`shards/{000000..000099}.tar`) or
a list of these; a shard may also be an `http(s)://` URL or a `pipe:COMMAND`, streamed into a
per-process cache of at most `open_shards` local files, with `retries` (see `data/remote.py`).
Sample i is member group k of shard j, where shards are taken in the order given and each holds
the count its manifest states (counted once from the tar headers when there is no manifest).
Nothing holds the dataset: a process keeps the per-shard counts and, for the last few shards it
read (`open_shards`), each member's offset and size, read from the tar headers the first time that
shard is opened. A sample is one seek and one read.

Shuffling and resume. Training visits the source in `epoch_order(seed, epoch)`, a pure function of
(seed, epoch) like every source's order (see `data/loader.py`), so a run killed anywhere, even in
the middle of a shard, resumes with the same samples in the same order, with any number of
DataLoader workers, and the checkpoint needs no more than the step. The order is built to read
shards locally instead of at random: per epoch the shards are permuted (or, with `resample`,
drawn with replacement), then each run of `mix_shards` consecutive shards is visited in a random
permutation of their members. That is what webdataset's shuffle buffer approximates, without a
buffer of decoded samples to hold, or to store in a checkpoint. Workers split the work by batch
(each builds whole batches), so no two read the same sample; splitting by rank is a slice of the
same sequence.

Bad data is skipped and counted like every other source: a tar that cannot be opened
(`corrupt_shard`), samples cut off by a truncated file or missing from a shard holding fewer than
its manifest says (`truncated_shard`), a `.json` that does not parse (`corrupt_record`), a `.txt`
that is not UTF-8 (`bad_encoding`), a sample without a member of a `required` modality
(`missing_<modality>`), a remote shard that cannot be fetched after its retries
(`unreachable_shard`, with one warning naming the URL and the error). Images, audio and points stay
encoded bytes; their transforms decode them and count what does not decode (`corrupt_image`, ...).
"""

from __future__ import annotations

import bisect
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import pydantic

from coalign.data.remote import FetchError, ShardCache, display_name, fetch, fetch_bytes, is_remote, sibling
from coalign.data.sample import Sample, clean_text
from coalign.data.shards import (
    KEY,
    MANIFEST,
    ShardIndex,
    ShardWriter,
    json_bytes,
    modality_of,
    parse_manifest,
    read_members,
    scan_shard,
)
from coalign.data.sources.base import SampleError, Source, ZeroShotTask, write_example_images
from coalign.data.sources.csv import parse_labels
from coalign.data.sources.labels import ClassLabels
from coalign.registry import SOURCES, ConfigError, StrictModel

log = logging.getLogger("coalign")


class WebDatasetConfig(StrictModel):
    path: str | list[str]  # a folder of .tar shards, a .tar, a brace pattern, or a list of these
    manifest: str | None = None  # default: manifest.json beside the first shard, when there is one
    shuffle: bool = True  # training order: shards permuted per epoch, members shuffled (module doc)
    resample: bool = False  # draw shards with replacement per epoch instead of permuting them
    mix_shards: int = pydantic.Field(4, ge=1)  # consecutive shards whose members are shuffled together
    modalities: list[str] | None = None  # read only these sample keys (default: every member)
    required: list[str] = ["text"]  # a sample without one of these is skipped as missing_<modality>
    open_shards: int = pydantic.Field(8, ge=1)  # shard indexes each process keeps (least recently used out)
    retries: int = pydantic.Field(3, ge=0)  # more tries for a remote shard after a transient failure
    timeout: float = pydantic.Field(60.0, gt=0)  # seconds a remote transfer may stall (a pipe: may run)
    cache_dir: str | None = None  # where remote shards are streamed to (default: the system's temp folder)

    @classmethod
    def tiny(cls) -> dict:
        return {}

    @pydantic.model_validator(mode="after")
    def _required_is_read(self) -> WebDatasetConfig:
        if self.modalities is not None:
            unread = [m for m in self.required if m not in self.modalities]
            if unread:
                raise ValueError(f"required {unread} are not among modalities {self.modalities}")
        return self


def expand_paths(path: str | list[str]) -> list[str]:
    """The shards `path` names, in order: a folder's *.tar (sorted), brace patterns expanded; local
    files as absolute paths (checked to exist), URLs and pipe: commands as they are."""
    out: list[str] = []
    for pattern in [path] if isinstance(path, str) else path:
        for name in braceexpand.braceexpand(pattern):
            if is_remote(name):
                out.append(name)
                continue
            p = Path(name).expanduser()
            if p.is_dir():
                found = sorted(p.glob("*.tar"))
                if not found:
                    raise ConfigError(f"webdataset source: no .tar shards in folder '{p}'")
                out.extend(str(f.absolute()) for f in found)
            elif p.is_file():
                out.append(str(p.absolute()))
            else:
                raise ConfigError(f"webdataset source: shard '{p}' (from '{pattern}') does not exist")
    if not out:
        raise ConfigError(f"webdataset source: path {path!r} names no shards")
    return out


class ShardOrder(Sequence):
    """One epoch's visiting order, position -> source index, computed lazily from (seed, epoch).

    Memory is one entry per shard plus one permutation of the `mix` shards being read, never one
    entry per sample of the dataset.
    """

    def __init__(self, counts: np.ndarray, starts: np.ndarray, seed: int, epoch: int, cfg: WebDatasetConfig):
        self.n = int(counts.sum())
        self.seed, self.epoch, self.shuffle = seed, epoch, cfg.shuffle
        rng = np.random.default_rng([seed, epoch, 0x5A4D])
        if cfg.resample:  # draws with replacement until the epoch has its length; the last is cut
            slots: list[int] = []
            total = 0
            while total < self.n:
                more = rng.integers(len(counts), size=len(counts))
                for s in more:
                    if total >= self.n:
                        break
                    slots.append(int(s))
                    total += int(counts[s])
            self.slots = np.array(slots, dtype=np.int64)
        elif cfg.shuffle:
            self.slots = rng.permutation(len(counts))
        else:
            self.slots = np.arange(len(counts))
        self.starts = starts
        self.slot_ends = np.cumsum(counts[self.slots])  # (slots,) end position of each slot
        self.mix = cfg.mix_shards if cfg.shuffle else 1
        group_ends = self.slot_ends[self.mix - 1 :: self.mix]
        if len(group_ends) == 0 or group_ends[-1] != self.slot_ends[-1]:
            group_ends = np.append(group_ends, self.slot_ends[-1])
        self.group_ends = np.minimum(group_ends, self.n)
        self._perm: tuple[int, np.ndarray] | None = None  # (group, its permutation): the one in use

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, pos: int) -> int:  # type: ignore[override]
        if not 0 <= pos < self.n:
            raise IndexError(f"position {pos} out of range 0..{self.n - 1}")
        if self.shuffle:
            group = bisect.bisect_right(self.group_ends, pos)
            start = int(self.group_ends[group - 1]) if group else 0
            pos = start + int(self._permutation(group, start)[pos - start])
        slot = bisect.bisect_right(self.slot_ends, pos)
        member = pos - (int(self.slot_ends[slot - 1]) if slot else 0)
        return int(self.starts[self.slots[slot]]) + member

    def _permutation(self, group: int, start: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != group:
            size = int(self.group_ends[group]) - start
            rng = np.random.default_rng([self.seed, self.epoch, group, 0x5A4D])
            self._perm = (group, rng.permutation(size))
        return self._perm[1]


@SOURCES.register("webdataset")
class WebDatasetSource(Source):
    """Samples of WebDataset tar shards: {"id", "image": bytes, "text", "audio": bytes, ..., "label"}."""

    Config = WebDatasetConfig

    def __init__(self, cfg: WebDatasetConfig | None = None, **kwargs: Any):
        self.cfg = cfg or WebDatasetConfig(**kwargs)
        self.paths = expand_paths(self.cfg.path)  # absolute local paths, URLs, pipe: commands
        self._cache = ShardCache(self.cfg.cache_dir) if any(map(is_remote, self.paths)) else None
        self._warned: set[int] = set()
        self.manifest, listed = self._manifest()
        self._indexes: OrderedDict[int, ShardIndex] = OrderedDict()
        counts = []
        for j, p in enumerate(self.paths):
            if p in listed:
                counts.append(listed[p])
            else:  # no manifest entry: count once from the headers (and keep the index while it is fresh)
                index = self._index(j)
                if index.reason == "unreachable_shard":  # nothing to count: say so now, not as skips later
                    raise ConfigError(f"webdataset source: {index.error}")
                counts.append(len(index.samples))
        self.counts = np.array(counts, dtype=np.int64)  # (shards,)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self._orders: OrderedDict[tuple[int, int], ShardOrder] = OrderedDict()

    def _manifest(self) -> tuple[dict[str, Any], dict[str, int]]:
        """The manifest (the one named, else the one beside the first shard, when there is one) and
        {shard location: sample count} of the shards it lists."""
        named = self.cfg.manifest
        first = self.paths[0]
        if named is not None and not is_remote(named):
            named = str(Path(named).expanduser().absolute())
        where = named or (
            sibling(first, MANIFEST) if is_remote(first) else str(Path(first).parent / MANIFEST)
        )
        manifest: dict[str, Any] | None = None
        if where is not None and is_remote(where):
            try:
                manifest = parse_manifest(fetch_bytes(where, self.cfg.retries, self.cfg.timeout))
            except FetchError as err:
                if named is not None or err.status != 404:  # beside the shards, none is fine
                    raise ConfigError(f"webdataset source: manifest: {err}") from None
        elif where is not None:
            try:
                manifest = parse_manifest(Path(where).read_bytes())
            except OSError:
                manifest = None
        if named is not None and not manifest:
            raise ConfigError(f"webdataset source: '{named}' is not a coalign shard manifest")
        self.manifest_location = where if manifest else None
        if not manifest or where is None:
            return {}, {}
        if is_remote(where):
            listed = {sibling(where, s["name"]): int(s["samples"]) for s in manifest.get("shards", [])}
        else:
            listed = {
                str(Path(where).parent / s["name"]): int(s["samples"]) for s in manifest.get("shards", [])
            }
        return manifest, listed

    def __len__(self) -> int:
        return int(self.counts.sum())

    def __getstate__(self) -> dict[str, Any]:  # workers start with empty caches (remote: their own folder)
        return {**self.__dict__, "_indexes": OrderedDict(), "_orders": OrderedDict(), "_warned": set()}

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, sample within the shard) of source index `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"webdataset index {index} out of range 0..{len(self) - 1}")
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return shard, index - int(self.starts[shard])

    def _index(self, shard: int) -> ShardIndex:
        """The member index of one shard, from a small LRU (one per process: workers have their own);
        a remote shard's local copy lives as long as its index."""
        if shard in self._indexes:
            self._indexes.move_to_end(shard)
            return self._indexes[shard]
        index = self._scan(shard)
        self._indexes[shard] = index
        while len(self._indexes) > self.cfg.open_shards:
            old, _ = self._indexes.popitem(last=False)
            if self._cache is not None:
                self._cache.drop(old)
        return index

    def _local(self, shard: int) -> Path:
        name = self.paths[shard]
        return self._cache.path(shard) if is_remote(name) else Path(name)

    def _scan(self, shard: int) -> ShardIndex:
        """Index a shard; a remote one is first streamed into the cache (an index with `error` and
        reason `unreachable_shard` when it cannot be fetched)."""
        name = self.paths[shard]
        if not is_remote(name):
            return scan_shard(Path(name))
        try:
            return scan_shard(fetch(name, self._cache.path(shard), self.cfg.retries, self.cfg.timeout))
        except FetchError as err:
            if shard not in self._warned:
                self._warned.add(shard)
                log.warning("webdataset source: skipping the samples of a shard: %s", err)
            return ShardIndex(error=str(err), reason="unreachable_shard")

    def members(self, index: int) -> tuple[str, dict[str, bytes], str]:
        """(key, {extension: bytes}, where) of sample `index`, or SampleError when its shard cannot
        give it."""
        shard, k = self.locate(index)
        where = f"{display_name(self.paths[shard])} sample {k}"
        found = self._index(shard)
        if found.error is not None:
            raise SampleError(found.reason, f"{where}: {found.error}")
        if k >= len(found.samples) or k in found.truncated:
            have = len(found.samples) - len(found.truncated)
            raise SampleError("truncated_shard", f"{where}: the shard holds {have} whole samples")
        key, members = found.samples[k]
        wanted = self.cfg.modalities
        if wanted is not None:
            members = tuple(m for m in members if modality_of(m[0]) in wanted or m[0] in ("json", "cls"))
        try:
            data = read_members(self._local(shard), members) if members else {}
        except OSError as err:
            raise SampleError("corrupt_shard", f"{where}: {err}") from None
        return key, data, where

    def __getitem__(self, index: int) -> Sample:
        key, data, where = self.members(index)
        return decode_members(key, data, where, self.cfg.required)

    def epoch_order(self, seed: int, epoch: int) -> Sequence[int]:
        if (seed, epoch) not in self._orders:
            self._orders[(seed, epoch)] = ShardOrder(self.counts, self.starts, seed, epoch, self.cfg)
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return self._orders[(seed, epoch)]

    def zero_shot_tasks(self) -> dict[str, ZeroShotTask]:
        tasks = self.manifest.get("zero_shot") or {}
        return {k: ZeroShotTask(k, t["classnames"], t["templates"]) for k, t in tasks.items()}

    @classmethod
    def example(cls, folder: Path) -> dict[str, Any]:
        """Two shards of plain-colour squares with captions and a label, and their manifest."""
        shards = folder / "shards"
        shards.mkdir(parents=True)
        writer = ShardWriter(shards, shard_size=4)
        for i, (rel, text, label) in enumerate(write_example_images(folder)):
            meta = json_bytes({"id": rel, "label": {"label": label}})
            writer.write(
                KEY.format(i), {"png": (folder / rel).read_bytes(), "txt": text.encode(), "json": meta}
            )
        writer.close({})
        return {"path": str(shards / "{000000..000001}.tar"), "manifest": str(shards / MANIFEST)}


# Shards store class indices (packing mapped names already); the manifest carries the class names.
INTEGER_LABELS = ClassLabels({}, [])


def decode_members(key: str, data: dict[str, bytes], where: str, required: list[str]) -> Sample:
    """One sample from its members: metadata parsed, text decoded, other modalities left as bytes."""
    sample: Sample = {"id": key}
    label: dict[str, int] = {}
    meta: dict[str, Any] = {}
    for ext, raw in data.items():
        if ext == "json":
            meta = _json(raw, where)
        elif ext == "cls":
            label |= parse_labels({"class": raw.decode("utf-8", "replace")}, ["class"], where, INTEGER_LABELS)
        elif (modality := modality_of(ext)) == "text":
            try:
                sample["text"] = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SampleError("bad_encoding", f"{where}: .{ext} is not UTF-8 text") from None
        elif modality is not None:
            sample[modality] = raw
    if meta.get("id") not in (None, ""):
        sample["id"] = clean_text(str(meta["id"]))
    labels = meta.get("label") or {}
    if not isinstance(labels, dict):
        raise SampleError("bad_label", f"{where}: 'label' is a {type(labels).__name__}, not an object")
    label |= parse_labels(labels, list(labels), where, INTEGER_LABELS)
    if isinstance(meta.get("captions"), list) and "text" in sample:
        sample["text"] = meta["captions"]
    if isinstance(meta.get("tabular"), dict):
        sample["tabular"] = meta["tabular"]
    for m in required:
        if sample.get(m) is None:
            raise SampleError(f"missing_{m}", f"{where}: no {m} member")
    sample["label"] = label
    return sample


def _json(raw: bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SampleError("corrupt_record", f"{where}: .json does not parse") from None
    if not isinstance(value, dict):
        raise SampleError("corrupt_record", f"{where}: .json is a {type(value).__name__}, not an object")
    return value
