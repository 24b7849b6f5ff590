"""A local Hugging Face `datasets` dataset: a folder written by `save_to_disk`, or parquet / arrow files.

`path` is one of:
- a folder written by `Dataset.save_to_disk` (`state.json` + `*.arrow`), or by
  `DatasetDict.save_to_disk` (`dataset_dict.json` + one folder per split; `split` picks one, and may
  be left out when there is only one), read with `datasets.load_from_disk`;
- a parquet file, a folder of them or a glob (`data/test-*.parquet`), read with
  `load_dataset("parquet", data_files=...)`, which converts them once into the datasets cache
  (`cache_dir`, default Hugging Face's own);
- an arrow file, a folder of them or a glob, memory-mapped where they lie (`Dataset.from_file`).

Nothing is downloaded: only local files are read. Columns: `image_column` (an `Image` feature, read
undecoded as its bytes or its path; or a column of bytes, or of paths, relative ones resolved against
`image_root`, default the dataset's folder), `caption_column` (a string or a list of strings: several
captions per image), `label_column` (class indices or, with `classnames`, class names), `id_column`.
A `ClassLabel` label column names its classes, so the source is zero-shot classifiable without
`classnames` (which override them); its -1 ("no label", as in test splits) is a missing label, a
counted `bad_label` skip. Decoding happens in the image transform, where a corrupt image is a counted
skip. A column that is not there is a ConfigError listing the columns the dataset has.

The `datasets` package is an optional dependency (`pip install 'coalign[hf]'`), imported only when
this source is built.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import pydantic

from coalign.data.sample import Sample, clean_text
from coalign.data.sources.base import EXAMPLE_COLOURS, SampleError, Source, ZeroShotTask, write_example_images
from coalign.data.sources.csv import blank, check_keys, parse_labels, resolve_path
from coalign.data.sources.labels import ZeroShotOptions
from coalign.registry import SOURCES, ConfigError, suggest

FORMATS = ("auto", "disk", "parquet", "arrow")


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise ConfigError(
            "the 'hf' source reads Hugging Face datasets; install them with "
            f"`pip install 'coalign[hf]'` ({err})"
        ) from None
    return datasets


class HFConfig(ZeroShotOptions):
    path: str  # a save_to_disk folder, or parquet / arrow files (a file, a folder of them or a glob)
    format: str = "auto"  # auto | disk | parquet | arrow; auto: by the files found at `path`
    split: str | None = None  # a split of a DatasetDict folder (default: its only split)
    image_column: str | None = "image"  # None: no images
    caption_column: str | None = "caption"  # None: no captions
    label_column: str | None = None  # copied into sample["label"][label_column]
    id_column: str | None = None  # default: the row index
    image_root: str | None = None  # relative image paths resolve against this; default: the dataset's folder
    cache_dir: str | None = None  # where parquet is converted to arrow; default: Hugging Face's cache

    @classmethod
    def tiny(cls) -> dict:
        return {}

    @pydantic.field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value not in FORMATS:
            raise ValueError(
                f"'{value}' is not a format{suggest(value, FORMATS)}; valid: {', '.join(FORMATS)}"
            )
        return value

    def label_key_names(self) -> list[str]:
        return [self.label_column] if self.label_column else []

    def columns(self) -> dict[str, str]:
        """Option name -> the column it names."""
        named = {f: getattr(self, f) for f in ("image_column", "caption_column", "label_column", "id_column")}
        return {f: c for f, c in named.items() if c is not None}


def _files(path: Path, suffix: str) -> list[str]:
    if any(ch in str(path) for ch in "*?["):
        return sorted(glob.glob(str(path.expanduser())))
    if path.is_dir():
        return sorted(str(p) for p in path.rglob(f"*{suffix}") if p.is_file())
    return [str(path)] if path.is_file() else []


def detect_format(path: Path) -> str:
    """The format of what lies at `path` (for `format: auto`)."""
    if not _files(path, "") and not path.exists():
        raise ConfigError(f"hf source: path '{path}' does not exist (nor matches any file, as a glob)")
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        return "disk"
    for fmt in ("parquet", "arrow"):
        if _files(path, f".{fmt}") and all(f.endswith(f".{fmt}") for f in _files(path, f".{fmt}")):
            return fmt
    raise ConfigError(
        f"hf source: '{path}' is neither a save_to_disk folder (state.json or dataset_dict.json) nor "
        "parquet / arrow files; set `format` if the files have other names"
    )


@SOURCES.register("hf")
class HFSource(Source):
    """Rows of a local Hugging Face dataset as samples {"id", "image": bytes or path, "text", "label"}."""

    Config = HFConfig

    def __init__(self, cfg: HFConfig | None = None, **kwargs: Any):
        self.cfg = cfg or HFConfig(**kwargs)
        datasets = _datasets()
        path = Path(self.cfg.path).expanduser()
        ds = self._load(datasets, path)
        check_keys(self.cfg.columns(), list(ds.column_names), "hf", path)
        ds = ds.select_columns(list(dict.fromkeys(self.cfg.columns().values())))
        image = self.cfg.image_column
        if image and isinstance(ds.features[image], datasets.Image):
            ds = ds.cast_column(
                image, datasets.Image(decode=False)
            )  # {"bytes", "path"}: the transform decodes
        names: dict[str, list[str]] = {}
        label = self.cfg.label_column
        self.class_label = bool(label) and isinstance(ds.features[label], datasets.ClassLabel)
        if self.class_label:
            names[label] = list(ds.features[label].names)
        self.classes = self.cfg.class_labels(extra=names)
        if label:
            values = ((f"row {i}", self._label(v)) for i, v in enumerate(ds[label]))
            self.classes.check(label, values, f"hf source '{path}'")
        self.ds = ds
        self.path = path
        self.root = Path(self.cfg.image_root).expanduser() if self.cfg.image_root else self._folder(path)

    def _load(self, datasets: Any, path: Path) -> Any:
        fmt = detect_format(path) if self.cfg.format == "auto" else self.cfg.format
        if fmt != "disk" and self.cfg.split is not None:
            raise ConfigError(
                f"hf source: split picks a split of a save_to_disk DatasetDict; for {fmt} files name the "
                f"files of one split in path (a glob such as data/{self.cfg.split}-*.{fmt})"
            )
        try:
            if fmt == "disk":
                return self._split(datasets.load_from_disk(str(path)), path)
            files = _files(path, f".{fmt}")
            if not files:
                raise ConfigError(f"hf source: no {fmt} files at '{path}'")
            if fmt == "arrow":
                parts = [datasets.Dataset.from_file(f) for f in files]
                return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
            return datasets.load_dataset(
                "parquet", data_files=files, split="train", cache_dir=self.cfg.cache_dir
            )
        except (OSError, ValueError, TypeError) as err:  # FileNotFoundError, a damaged arrow/parquet file
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"hf source: cannot read '{path}' as {fmt}: {err}") from None

    def _split(self, loaded: Any, path: Path) -> Any:
        if not hasattr(loaded, "keys"):  # a Dataset
            if self.cfg.split is not None:
                raise ConfigError(f"hf source '{path}': a single Dataset, it has no splits; remove split")
            return loaded
        splits = list(loaded.keys())
        split = self.cfg.split
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in splits:
            problem = (
                "pick one with split" if split is None else f"no split '{split}'{suggest(split, splits)}"
            )
            raise ConfigError(f"hf source '{path}': {problem}; splits: {', '.join(splits)}")
        return loaded[split]

    @staticmethod
    def _folder(path: Path) -> Path:
        while any(ch in str(path) for ch in "*?[") or not path.is_dir():
            path = path.parent
        return path

    def _label(self, value: Any) -> Any:
        return None if self.class_label and value == -1 else value  # ClassLabel's -1: no label

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(f"hf index {index} out of range 0..{len(self) - 1}")
        cfg = self.cfg
        row = self.ds[index]
        where = f"{self.path.name} row {index}"
        out: Sample = {}
        rid = row.get(cfg.id_column) if cfg.id_column else None
        out["id"] = clean_text(str(rid)) if rid not in (None, "") else str(index)
        if cfg.image_column:
            out["image"] = self._image(row[cfg.image_column], where)
        if cfg.caption_column:
            text = row[cfg.caption_column]
            out["text"] = text if isinstance(text, str | list) else ""  # "" becomes an empty_caption skip
        labels = {cfg.label_column: self._label(row[cfg.label_column])} if cfg.label_column else {}
        out["label"] = parse_labels(labels, list(labels), where, self.classes)
        return out

    def _image(self, value: Any, where: str) -> Any:
        """Encoded bytes, a path, or a decoded value (PIL image, array) as it is; none -> SampleError."""
        if isinstance(value, dict):  # an undecoded Image feature
            if value.get("bytes"):
                return value["bytes"]
            value = value.get("path")
        if isinstance(value, bytes | bytearray):
            if not value:
                raise SampleError("missing_image", f"{where}: empty image bytes")
            return bytes(value)
        if isinstance(value, str) or blank(value):
            return resolve_path(self.root, value, where)
        return value

    def zero_shot_tasks(self) -> dict[str, ZeroShotTask]:
        return self.classes.tasks()

    @classmethod
    def example(cls, folder: Path) -> dict[str, Any]:
        """A save_to_disk DatasetDict (test split) with an Image feature and a ClassLabel column."""
        datasets = _datasets()
        rows = write_example_images(folder / "images")
        features = datasets.Features(
            {
                "image": datasets.Image(),
                "caption": datasets.Value("string"),
                "label": datasets.ClassLabel(names=[name for name, _ in EXAMPLE_COLOURS]),
            }
        )
        data = {
            "image": [str(folder / "images" / rel) for rel, _, _ in rows],
            "caption": [text for _, text, _ in rows],
            "label": [y for _, _, y in rows],
        }
        ds = datasets.Dataset.from_dict(data, features=features)
        datasets.DatasetDict({"test": ds}).save_to_disk(str(folder / "hf"))
        return {"path": str(folder / "hf"), "label_column": "label"}
