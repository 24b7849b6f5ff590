"""CSV/TSV manifests in OpenCLIP's format: one row per image, an image-path column and a caption column.

The manifest is read once at construction so a wrong column name fails at start; images are not
opened here. Decoding belongs to the image transform, where a missing or corrupt file becomes a
counted `SampleError` instead of a crash.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pydantic

from coalign.data.sources.base import Sample, SampleError, Source
from coalign.registry import SOURCES, ConfigError, StrictModel, suggest

SEPARATOR_ALIASES = {"tab": "\t", "\\t": "\t", "comma": ",", "pipe": "|"}


class CSVConfig(StrictModel):
    path: str
    image_key: str = "filepath"  # OpenCLIP's --csv-img-key default
    caption_key: str = "title"  # OpenCLIP's --csv-caption-key default
    separator: str | None = None  # default: tab for .tsv, comma otherwise
    root: str | None = None  # relative image paths resolve against this; default: the manifest's folder
    label_keys: list[str] = []  # integer columns copied into sample["label"]

    @classmethod
    def smoke_options(cls) -> dict:
        return {}

    @pydantic.field_validator("separator")
    @classmethod
    def _one_char(cls, v: str | None) -> str | None:
        if v is not None and len(SEPARATOR_ALIASES.get(v, v)) != 1:
            raise ValueError(f"must be one character or one of {', '.join(SEPARATOR_ALIASES)}")
        return v

    def resolved_separator(self) -> str:
        if self.separator is None:
            return "\t" if self.path.lower().endswith(".tsv") else ","
        return SEPARATOR_ALIASES.get(self.separator, self.separator)


def existing_file(path: str, kind: str) -> Path:
    """The manifest path, or a ConfigError naming the `path` field when there is no such file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{kind} source: path '{p}' does not exist or is not a file")
    return p


def check_keys(wanted: dict[str, str], present: list[str], kind: str, path: Path) -> None:
    """Fail at start when a configured column/key is absent, listing what the file does have."""
    for field, key in wanted.items():
        if key not in present:
            raise ConfigError(
                f"{kind} source '{path}': {field} '{key}' not found{suggest(key, present)}; "
                f"available: {', '.join(present) or '(none)'}"
            )


def resolve_image(root: Path, value: Any, where: str) -> str:
    """An absolute path string for an image cell (relative paths join `root`); empty -> SampleError."""
    if value is None or not str(value).strip():
        raise SampleError("missing_image", f"{where}: no image path")
    p = Path(str(value).strip()).expanduser()
    return str(p if p.is_absolute() else (root / p).absolute())


def parse_labels(values: dict[str, Any], keys: list[str], where: str) -> dict[str, int]:
    """Integer labels from `values`; a missing or non-integer one makes the sample unusable."""
    out: dict[str, int] = {}
    for k in keys:
        v = values.get(k)
        try:
            if isinstance(v, bool) or v is None or (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            out[k] = int(str(v).strip()) if isinstance(v, str) else int(v)
        except (TypeError, ValueError):
            raise SampleError("bad_label", f"{where}: label '{k}' is {v!r}, not an integer") from None
    return out


@SOURCES.register("csv")
class CSVSource(Source):
    """Rows of a CSV/TSV manifest as samples {"id", "image": absolute path, "text", "label"}."""

    Config = CSVConfig

    def __init__(self, cfg: CSVConfig | None = None, **kwargs: Any):
        self.cfg = cfg or CSVConfig(**kwargs)
        self.path = existing_file(self.cfg.path, "csv")
        self.root = Path(self.cfg.root).expanduser() if self.cfg.root else self.path.parent
        # Keep only the needed columns, as lists: a manifest may have millions of rows.
        with open(self.path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=self.cfg.resolved_separator())
            header = [h for h in (reader.fieldnames or []) if h is not None]
            wanted = {"image_key": self.cfg.image_key, "caption_key": self.cfg.caption_key}
            wanted |= {f"label_keys[{i}]": k for i, k in enumerate(self.cfg.label_keys)}
            check_keys(wanted, header, "csv", self.path)
            keep = list(dict.fromkeys([*wanted.values(), *(["id"] if "id" in header else [])]))
            self.columns: dict[str, list[str | None]] = {k: [] for k in keep}
            for row in reader:
                for k in keep:
                    self.columns[k].append(row.get(k))

    def __len__(self) -> int:
        return len(self.columns[self.cfg.image_key])

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(f"csv index {index} out of range 0..{len(self) - 1}")
        where = f"{self.path.name} row {index}"
        ids = self.columns.get("id")
        row = {k: v[index] for k, v in self.columns.items()}
        return {
            "id": str(ids[index]) if ids and ids[index] not in (None, "") else str(index),
            "image": resolve_image(self.root, row[self.cfg.image_key], where),
            "text": row[self.cfg.caption_key] or "",
            "label": parse_labels(row, self.cfg.label_keys, where),
        }
