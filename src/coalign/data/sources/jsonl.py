"""JSON Lines manifests: one object per line with an image path and one caption or a list of captions.

A line that is not valid JSON must not end a long run: it is remembered at construction and
raises `SampleError("corrupt_record")` when its sample is read, so it is skipped and counted.
Blank lines are not samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from coalign.data.sources.base import Sample, SampleError, Source
from coalign.data.sources.csv import check_keys, existing_file, parse_labels, resolve_image
from coalign.registry import SOURCES, StrictModel


class JSONLConfig(StrictModel):
    path: str
    image_key: str = "image"
    caption_key: str = "caption"  # a string, or a list of strings (several captions per image)
    root: str | None = None  # relative image paths resolve against this; default: the manifest's folder
    label_keys: list[str] = []  # integer fields copied into sample["label"]

    @classmethod
    def smoke_options(cls) -> dict:
        return {}


def _caption(value: Any) -> str | list[str]:
    """A caption string or list of strings; anything else becomes "" (an empty_caption skip later)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return ""


@SOURCES.register("jsonl")
class JSONLSource(Source):
    """Lines of a JSONL manifest as samples {"id", "image": absolute path, "text", "label"}."""

    Config = JSONLConfig

    def __init__(self, cfg: JSONLConfig | None = None, **kwargs: Any):
        self.cfg = cfg or JSONLConfig(**kwargs)
        self.path = existing_file(self.cfg.path, "jsonl")
        self.root = Path(self.cfg.root).expanduser() if self.cfg.root else self.path.parent
        keep = [self.cfg.image_key, self.cfg.caption_key, "id", *self.cfg.label_keys]
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
            wanted = {"image_key": self.cfg.image_key, "caption_key": self.cfg.caption_key}
            wanted |= {f"label_keys[{i}]": k for i, k in enumerate(self.cfg.label_keys)}
            check_keys(wanted, sorted(seen), "jsonl", self.path)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(f"jsonl index {index} out of range 0..{len(self) - 1}")
        rec = self.records[index]
        if isinstance(rec, str):
            raise SampleError("corrupt_record", f"{self.path.name} {rec}")
        where = f"{self.path.name} line {rec['_line']}"
        rid = rec.get("id")
        return {
            "id": str(rid) if rid not in (None, "") else str(index),
            "image": resolve_image(self.root, rec.get(self.cfg.image_key), where),
            "text": _caption(rec.get(self.cfg.caption_key)),
            "label": parse_labels(rec, self.cfg.label_keys, where),
        }
