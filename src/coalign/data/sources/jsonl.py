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
configuration error); a line lacking a key is a missing modality, decided per line. A bad line must
not end a long run: one that is not valid JSON (or not an object, or nested too deeply to parse) is
remembered at construction and raises `SampleError("corrupt_record")` when its sample is read, one
that is not UTF-8 raises `SampleError("bad_encoding")`; either is skipped and counted, its message
naming the line. Blank lines are not samples. A file none of whose lines is a JSON object is a
one-line ConfigError. Captions are kept as read; `sample.captions` cleans them for every consumer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from coalign.data.sample import Sample, clean_text
from coalign.data.sources.base import (
    EXAMPLE_COLOURS,
    SampleError,
    Source,
    ZeroShotTask,
    write_example_images,
)
from coalign.data.sources.csv import (
    ManifestConfig,
    blank,
    check_keys,
    existing_file,
    manifest_modalities,
    parse_labels,
)
from coalign.registry import SOURCES, ConfigError

BOM = b"\xef\xbb\xbf"


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


def _parse(raw: bytes, lineno: int, keep: list[str]) -> dict[str, Any] | tuple[str, str] | None:
    """One line: the used fields (plus "_line", and "_keys": every key it has), a (reason, detail)
    when it cannot be used, or None for a blank line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return "bad_encoding", f"line {lineno}: byte {raw[err.start]:#04x} at column {err.start} is not UTF-8"
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        return "corrupt_record", f"line {lineno}: invalid JSON ({err.msg})"
    except RecursionError:
        return "corrupt_record", f"line {lineno}: JSON nested too deeply"
    if not isinstance(obj, dict):
        return "corrupt_record", f"line {lineno}: a {type(obj).__name__}, not an object"
    return {k: obj[k] for k in keep if k in obj} | {"_line": lineno, "_keys": list(obj)}


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
        # Each record keeps only the fields used (dict) or, for a bad line, (reason, why it is bad).
        self.records: list[dict[str, Any] | tuple[str, str]] = []
        seen: set[str] = set()
        try:
            with open(self.path, "rb") as f:
                for lineno, raw in enumerate(f, start=1):
                    record = _parse(raw[3:] if lineno == 1 and raw.startswith(BOM) else raw, lineno, keep)
                    if isinstance(record, dict):
                        seen.update(record.pop("_keys"))
                    if record is not None:
                        self.records.append(record)
        except OSError as err:
            raise ConfigError(f"jsonl source: cannot read '{self.path}': {err.strerror or err}") from None
        if self.records and all(isinstance(r, tuple) for r in self.records):
            raise ConfigError(
                f"jsonl source '{self.path}': no line is a JSON object (is it a jsonl file?); "
                f"{self.records[0][1]}"
            )
        if any(isinstance(r, dict) for r in self.records):  # a wrong key name fails at start
            check_keys(wanted, sorted(seen), "jsonl", self.path)
        self.classes = self.cfg.class_labels()
        for key in self.cfg.label_keys:  # a label the class list lacks fails now, not mid-evaluation
            values = ((f"line {r['_line']}", r.get(key)) for r in self.records if isinstance(r, dict))
            self.classes.check(key, values, f"jsonl source '{self.path}'")

    @classmethod
    def example(cls, folder: Path) -> dict[str, Any]:
        rows = write_example_images(folder)
        lines = [json.dumps({"image": path, "caption": text, "label": label}) for path, text, label in rows]
        (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
        # Integer labels named by class and template files in CLIP_benchmark's layout.
        names = {"colours": [name for name, _ in EXAMPLE_COLOURS], "other": ["x"]}
        (folder / "classnames.json").write_text(json.dumps(names))
        (folder / "templates.json").write_text(json.dumps({"colours": ["a {c} square."]}))
        return {
            "path": str(folder / "manifest.jsonl"),
            "label_keys": ["label"],
            "classnames": str(folder / "classnames.json"),
            "templates": str(folder / "templates.json"),
            "dataset_name": "colours",
        }

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(f"jsonl index {index} out of range 0..{len(self) - 1}")
        rec = self.records[index]
        if isinstance(rec, tuple):
            raise SampleError(rec[0], f"{self.path.name} {rec[1]}")
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
            "id": clean_text(str(rid)) if rid not in (None, "") else str(index),
            **manifest_modalities(cfg, self.root, raw, where),
            "label": parse_labels(rec, cfg.label_keys, where, self.classes),
        }

    def zero_shot_tasks(self) -> dict[str, ZeroShotTask]:
        return self.classes.tasks()
