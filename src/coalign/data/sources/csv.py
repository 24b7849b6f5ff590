"""CSV/TSV manifests: OpenCLIP's format (an image-path column and a caption column), for any modality.

One row is one sample. Besides `image_key` and `caption_key`, `modality_keys` names a column holding a
file path per modality (`{audio: wav_path, points: cloud}`) and `tabular_keys` names columns whose cells
form an inline tabular record `{column: value}` (numbers are parsed where they parse; an empty cell is
a missing field). Relative paths resolve against `root` (default: the manifest's folder). Set
`image_key: null` (or `caption_key: null`) for a manifest without images (or captions).

Missing modalities are normal: an empty cell gives a sample without that key, which collate records in
`batch["present"]`. A modality listed in `required` (default: image when `image_key` is set, and text when
`caption_key` is set) is the exception: an empty image/audio/points/tabular cell is a
`SampleError("missing_<modality>")`, and an empty caption stays "" so the text transform counts it as
`empty_caption`, as it always has. A row with none of the configured modalities is a
`SampleError("no_modalities")`.

A bad row does not end the file: a row whose used cells hold bytes that are not UTF-8 is a
`SampleError("bad_encoding")`, one that csv cannot parse (a field over csv's size limit) or that has
more non-empty fields than the header (an unquoted separator shifts every column after it) is a
`SampleError("bad_row")`; both keep their place (index i is still the i-th row) and their message
names the row and its file line. A file that cannot be read at all (no header with the configured
columns, not text, unreadable) is a one-line ConfigError at construction.

The manifest is read once at construction so a wrong column name fails at start; files are not opened
here. Decoding belongs to the transforms, where a missing or corrupt file becomes a counted
`SampleError` instead of a crash.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import numpy as np
import pydantic

from coalign.data.sample import META_KEYS, Sample
from coalign.data.sources.base import (
    EXAMPLE_COLOURS,
    SampleError,
    Source,
    ZeroShotTask,
    write_example_images,
)
from coalign.data.sources.labels import ClassLabels, ZeroShotOptions
from coalign.registry import SOURCES, ConfigError, suggest

SEPARATOR_ALIASES = {"tab": "\t", "\\t": "\t", "comma": ",", "pipe": "|"}
# Modalities with an option of their own, and sample keys that are not modalities at all.
OWN_OPTION = {"image": "image_key", "text": "caption_key", "tabular": "tabular_keys"}
_NUMBER = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf|infinity|nan)", re.IGNORECASE)
_INTEGER = re.compile(r"[+-]?\d+")


class ManifestConfig(ZeroShotOptions):
    """Options shared by the csv and jsonl sources: which column/key holds which modality, and the
    class names of the label columns (`classnames`, `templates`, `dataset_name`: see labels.py)."""

    path: str
    image_key: str | None = "image"  # None: the manifest has no images
    caption_key: str | None = "caption"  # None: the manifest has no captions
    root: str | None = None  # relative paths resolve against this; default: the manifest's folder
    label_keys: list[str] = []  # label columns copied into sample["label"]: indices, or names with classnames
    modality_keys: dict[str, str] = {}  # modality -> column holding a file path, e.g. {audio: wav_path}
    tabular_keys: list[str] = []  # columns that together form sample["tabular"] = {column: value}
    required: list[str] | None = None  # modalities a row must have; default: image (if set) and text (if set)

    @classmethod
    def tiny(cls) -> dict:
        return {}

    @pydantic.field_validator("modality_keys")
    @classmethod
    def _modality_names(cls, v: dict[str, str]) -> dict[str, str]:
        for modality, key in v.items():
            if modality in OWN_OPTION:
                raise ValueError(f"'{modality}' has an option of its own: use {OWN_OPTION[modality]}")
            if not modality or modality in META_KEYS or "@" in modality:
                raise ValueError(
                    f"'{modality}' is not a modality name (not empty, not one of {', '.join(META_KEYS)}, "
                    "no '@': views are made by transforms)"
                )
            if not key:
                raise ValueError(f"modality '{modality}' needs a non-empty column/key name")
        return v

    @pydantic.model_validator(mode="after")
    def _check_required(self) -> ManifestConfig:
        configured = self.modalities()
        if not configured:
            options = "image_key, caption_key, modality_keys or tabular_keys"
            raise ValueError(f"no modality configured: set {options}")
        for m in self.required or []:
            if m not in configured:
                hint = f" (add it to {OWN_OPTION.get(m, 'modality_keys')})"
                raise ValueError(
                    f"required: '{m}' is not a modality of this manifest{suggest(m, configured)}; "
                    f"configured: {', '.join(configured)}{hint}"
                )
        return self

    def label_key_names(self) -> list[str]:
        return list(self.label_keys)

    def has_tabular(self) -> bool:
        return bool(self.tabular_keys)

    def modalities(self) -> list[str]:
        """The modalities a sample of this manifest may carry, in a fixed order."""
        out = (["image"] if self.image_key else []) + (["text"] if self.caption_key else [])
        return out + list(self.modality_keys) + (["tabular"] if self.has_tabular() else [])

    def required_modalities(self) -> set[str]:
        if self.required is not None:
            return set(self.required)
        return {m for m, key in (("image", self.image_key), ("text", self.caption_key)) if key}

    def wanted_keys(self) -> dict[str, str]:
        """Option name -> the column/key it names; each must exist in the manifest."""
        wanted = {"image_key": self.image_key, "caption_key": self.caption_key}
        wanted |= {f"modality_keys.{m}": k for m, k in self.modality_keys.items()}
        wanted |= {f"tabular_keys[{i}]": k for i, k in enumerate(self.tabular_keys)}
        wanted |= {f"label_keys[{i}]": k for i, k in enumerate(self.label_keys)}
        return {field: key for field, key in wanted.items() if key is not None}


class CSVConfig(ManifestConfig):
    image_key: str | None = "filepath"  # OpenCLIP's --csv-img-key default
    caption_key: str | None = "title"  # OpenCLIP's --csv-caption-key default
    separator: str | None = None  # default: tab for .tsv, comma otherwise

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


def not_utf8(text: str) -> bool:
    """True for text read with errors="surrogateescape" that held bytes which are not UTF-8."""
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def blank(value: Any) -> bool:
    """True when a cell holds nothing usable: None, a blank string, or an empty list/dict/array."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, dict):
        return not value
    if isinstance(value, list | tuple):
        return all(blank(v) for v in value)
    if isinstance(value, np.ndarray):
        return value.size == 0
    return False


def resolve_path(root: Path, value: Any, where: str, modality: str = "image") -> str:
    """An absolute path string for a file cell (relative paths join `root`); blank -> SampleError."""
    if blank(value):
        raise SampleError(f"missing_{modality}", f"{where}: no {modality} path")
    p = Path(str(value).strip()).expanduser()
    return str(p if p.is_absolute() else (root / p).absolute())


def parse_cell(text: str) -> int | float | str:
    """A CSV cell as an int or float when it reads as a number (`3`, `-0.5`, `1e3`, `nan`), else the text."""
    s = text.strip()
    if _INTEGER.fullmatch(s):
        return int(s)
    return float(s) if _NUMBER.fullmatch(s) else s


def parse_labels(values: dict[str, Any], keys: list[str], where: str, classes: ClassLabels) -> dict[str, int]:
    """Class indices from `values` (integers, or class names of keys with classnames); a missing or
    unusable one makes the sample unusable (SampleError "bad_label")."""
    return {k: classes.label(k, values.get(k), where) for k in keys}


def manifest_modalities(cfg: ManifestConfig, root: Path, raw: dict[str, Any], where: str) -> Sample:
    """The modality values of one row: file paths resolved, blank optional ones left out.

    `raw` maps each configured modality to its undecoded value (None/blank when the row lacks it).
    Text and tabular values are inline; an np.ndarray (inline JSON numbers) passes through; anything
    else is a file path.
    """
    required = cfg.required_modalities()
    out: Sample = {}
    for m, v in raw.items():
        if blank(v):
            if m not in required:
                continue
            if m == "text":  # the text transform counts it as empty_caption, as it always has
                out[m] = "" if v is None else v
                continue
            raise SampleError(f"missing_{m}", f"{where}: no {m} (required)")
        inline = m in ("text", "tabular") or isinstance(v, np.ndarray)
        out[m] = v if inline else resolve_path(root, v, where, m)
    if not out:
        raise SampleError("no_modalities", f"{where}: none of {', '.join(raw)} is present")
    return out


@SOURCES.register("csv")
class CSVSource(Source):
    """Rows of a CSV/TSV manifest as samples {"id", <modality>: path or value, ..., "label"}."""

    Config = CSVConfig

    def __init__(self, cfg: CSVConfig | None = None, **kwargs: Any):
        self.cfg = cfg or CSVConfig(**kwargs)
        self.path = existing_file(self.cfg.path, "csv")
        self.root = Path(self.cfg.root).expanduser() if self.cfg.root else self.path.parent
        # Keep only the needed columns, as lists: a manifest may have millions of rows.
        self.columns: dict[str, list[str | None]] = {}
        self.bad: dict[int, tuple[str, str]] = {}  # row -> (reason, detail) for rows that cannot be used
        self.rows = 0
        try:
            # surrogateescape: a byte that is not UTF-8 becomes a lone surrogate (U+DC80..U+DCFF) instead
            # of ending the whole file; the rows that hold one are found below and skipped one by one.
            with open(self.path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
                self._read(csv.reader(f, delimiter=self.cfg.resolved_separator()))
        except OSError as err:
            raise ConfigError(f"csv source: cannot read '{self.path}': {err.strerror or err}") from None
        self.classes = self.cfg.class_labels()
        for key in self.cfg.label_keys:  # a label the class list lacks fails now, not mid-evaluation
            cells = ((f"row {i}", v) for i, v in enumerate(self.columns[key]) if i not in self.bad)
            self.classes.check(key, cells, f"csv source '{self.path}'")

    def _read(self, reader: Any) -> None:
        try:
            header = next(reader, [])
        except csv.Error as err:
            raise ConfigError(f"csv source '{self.path}': cannot read the header row: {err}") from None
        if any(not_utf8(h) for h in header):
            raise ConfigError(
                f"csv source '{self.path}': the header row is not UTF-8 text (is it a csv file?)"
            )
        wanted = self.cfg.wanted_keys()
        check_keys(wanted, header, "csv", self.path)
        keep = list(dict.fromkeys([*wanted.values(), *(["id"] if "id" in header else [])]))
        at = {k: header.index(k) for k in keep}
        self.columns = {k: [] for k in keep}
        line = reader.line_num + 1  # the file line where the next row starts
        while True:
            try:
                row = next(reader)
                problem = self._check(row, len(header), at)
            except StopIteration:
                break
            except (
                csv.Error
            ) as err:  # e.g. a field over csv's size limit; the reader goes on at the next line
                row, problem = [], ("bad_row", str(err))
            if not row and problem is None:
                line = reader.line_num + 1
                continue  # a blank line is not a row (as csv.DictReader has it)
            if problem is not None:
                reason, detail = problem
                self.bad[self.rows] = (reason, f"{self.path.name} row {self.rows} (line {line}): {detail}")
            for k, i in at.items():
                self.columns[k].append(row[i] if problem is None and i < len(row) else None)
            self.rows += 1
            line = reader.line_num + 1

    @staticmethod
    def _check(row: list[str], width: int, at: dict[str, int]) -> tuple[str, str] | None:
        """Why this row cannot be used, or None."""
        if any(cell.strip() for cell in row[width:]):
            return "bad_row", f"{len(row)} fields under a header of {width} (an unquoted separator?)"
        for k, i in at.items():
            if i < len(row) and not_utf8(row[i]):
                return "bad_encoding", f"column '{k}' is not UTF-8 text"
        return None

    @classmethod
    def example(cls, folder: Path) -> dict[str, Any]:
        # String labels, mapped to indices by an inline class list.
        rows = [(path, text, EXAMPLE_COLOURS[y][0]) for path, text, y in write_example_images(folder)]
        with open(folder / "manifest.csv", "w", newline="") as f:
            csv.writer(f).writerows([("filepath", "title", "label"), *rows])
        names = [name for name, _ in EXAMPLE_COLOURS]
        return {"path": str(folder / "manifest.csv"), "label_keys": ["label"], "classnames": names}

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(f"csv index {index} out of range 0..{len(self) - 1}")
        if index in self.bad:
            raise SampleError(*self.bad[index])
        cfg = self.cfg
        where = f"{self.path.name} row {index}"
        ids = self.columns.get("id")
        row = {k: v[index] for k, v in self.columns.items()}
        raw: dict[str, Any] = {}
        if cfg.image_key:
            raw["image"] = row[cfg.image_key]
        if cfg.caption_key:
            raw["text"] = row[cfg.caption_key]
        raw |= {m: row[k] for m, k in cfg.modality_keys.items()}
        if cfg.tabular_keys:
            raw["tabular"] = {k: parse_cell(row[k]) for k in cfg.tabular_keys if not blank(row[k])}
        return {
            "id": str(ids[index]) if ids and ids[index] not in (None, "") else str(index),
            **manifest_modalities(cfg, self.root, raw, where),
            "label": parse_labels(row, cfg.label_keys, where, self.classes),
        }

    def zero_shot_tasks(self) -> dict[str, ZeroShotTask]:
        return self.classes.tasks()
