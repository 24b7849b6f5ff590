"""JSON Lines manifests: one object per line naming a file (or holding inline values) per modality.

The classic line is `{"image": path, "caption": "..." or ["...", ...]}`. The options are those of the
csv source (see its docstring): `modality_keys` maps a modality to the key holding its file path
(`{audio: wav}`), where a list of numbers instead of a path is taken as inline data (a float32 array,
e.g. a small point cloud); `tabular_keys` are top-level fields that form `sample["tabular"]`, and
`tabular_key` names one object field (or a JSON string of one) holding the record; the two merge,
`tabular_keys` winning. Null or "" values are missing fields. `image_key: null` is a manifest without
images. A modality a line lacks (absent key, null, "", []) is simply not in its sample unless it is
in `required` (default: image when set, and text), as in the csv source.

Configured keys are checked at start against the keys seen on any line (a key every line lacks is a
configuration error); a line lacking a key is a missing modality, decided per line. A line that is
not valid JSON must not end a long run: it is remembered at construction and raises
`SampleError("corrupt_record")` when its sample is read, so it is skipped and counted. Blank lines
are not samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from coalign.data.sources.base import Sample, SampleError, Source
from coalign.data.sources.csv import (
    ManifestConfig,
    blank,
    check_keys,
    existing_file,
    manifest_modalities,
    parse_labels,
)
from coalign.registry import SOURCES


class JSONLConfig(ManifestConfig):
    image_key: str | None = "image"
    caption_key: str | None = "caption"  # a string, or a list of strings (several captions per image)
    tabular_key: str | None = None  # an object field {name: value} used as sample["tabular"]

    def has_tabular(self) -> bool:
        return bool(self.tabular_keys) or self.tabular_key is not None

    def wanted_keys(self) -> dict[str, str]:
        tabular = {"tabular_key": self.tabular_key} if self.tabular_key is not None else {}
        return super().wanted_keys() | tabular


def _caption(value: Any) -> str | list[str]:
    """A caption string or list of strings; anything else becomes "" (an empty_caption skip later)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return ""


def _file_or_array(value: Any, modality: str, where: str) -> Any:
    """A path stays a path (resolved later); a list of numbers becomes a float32 array (inline data)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        if blank(value):
            return None
        try:
            return np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            detail = f"{where}: inline {modality} is not a numeric array"
            raise SampleError(f"corrupt_{modality}", detail) from None
    detail = f"{where}: a {type(value).__name__}, not a path or a list of numbers"
    raise SampleError(f"corrupt_{modality}", detail)


def _tabular(rec: dict[str, Any], cfg: JSONLConfig, where: str) -> dict[str, Any]:
    """The tabular record of one line, without null or empty fields ({} when it has none)."""
    out: dict[str, Any] = {}
    if cfg.tabular_key is not None:
        value = rec.get(cfg.tabular_key)
        if isinstance(value, str) and value.strip():
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise SampleError("corrupt_tabular", f"{where}: '{cfg.tabular_key}': {err.msg}") from None
        if isinstance(value, dict):
            out |= value
        elif not blank(value):
            raise SampleError(
                "corrupt_tabular", f"{where}: '{cfg.tabular_key}' is a {type(value).__name__}, not an object"
            )
    out |= {k: rec[k] for k in cfg.tabular_keys if k in rec}
    return {k: v for k, v in out.items() if not blank(v)}


@SOURCES.register("jsonl")
class JSONLSource(Source):
    """Lines of a JSONL manifest as samples {"id", <modality>: path or value, ..., "label"}."""

    Config = JSONLConfig

    def __init__(self, cfg: JSONLConfig | None = None, **kwargs: Any):
        self.cfg = cfg or JSONLConfig(**kwargs)
        self.path = existing_file(self.cfg.path, "jsonl")
        self.root = Path(self.cfg.root).expanduser() if self.cfg.root else self.path.parent
        wanted = self.cfg.wanted_keys()
        keep = list(dict.fromkeys([*wanted.values(), "id"]))
        # Each record keeps only the fields used (dict) or, for a bad line, why it is bad (str).
        self.records: list[dict[str, Any] | str] = []
        seen: set[str] = set()
        with open(self.path, encoding="utf-8-sig", errors="replace") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    self.records.append(f"line {lineno}: invalid JSON ({err.msg})")
                    continue
                if not isinstance(obj, dict):
                    self.records.append(f"line {lineno}: a {type(obj).__name__}, not an object")
                    continue
                seen.update(obj)
                self.records.append({k: obj[k] for k in keep if k in obj} | {"_line": lineno})
        if any(isinstance(r, dict) for r in self.records):  # a wrong key name fails at start
            check_keys(wanted, sorted(seen), "jsonl", self.path)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(f"jsonl index {index} out of range 0..{len(self) - 1}")
        rec = self.records[index]
        if isinstance(rec, str):
            raise SampleError("corrupt_record", f"{self.path.name} {rec}")
        cfg = self.cfg
        where = f"{self.path.name} line {rec['_line']}"
        raw: dict[str, Any] = {}
        if cfg.image_key:
            raw["image"] = rec.get(cfg.image_key)
        if cfg.caption_key:
            raw["text"] = _caption(rec.get(cfg.caption_key))
        raw |= {m: _file_or_array(rec.get(k), m, where) for m, k in cfg.modality_keys.items()}
        if cfg.has_tabular():
            raw["tabular"] = _tabular(rec, cfg, where)
        rid = rec.get("id")
        return {
            "id": str(rid) if rid not in (None, "") else str(index),
            **manifest_modalities(cfg, self.root, raw, where),
            "label": parse_labels(rec, cfg.label_keys, where),
        }
