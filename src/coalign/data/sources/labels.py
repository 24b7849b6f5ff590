"""Class names and prompt templates for any labelled source: the zero-shot options csv, jsonl and hf share.

A source with label columns becomes zero-shot classifiable when it is given `classnames`:

    classnames: [cat, dog, bird]                  # inline, for the source's one label key
    classnames: classnames.json                   # CLIP_benchmark's layout {dataset: [names...]},
    dataset_name: cifar10                         #   the key picked by dataset_name
    classnames: {species: [cat, dog], size: sizes.json}   # several label keys, one list each
    templates: ["a photo of a {c}.", ...]         # or a CLIP_benchmark templates JSON; `{c}` or `{}`

Templates default to `DEFAULT_TEMPLATES`. A JSON file whose one key is the dataset (or a plain list)
needs no `dataset_name`. Relative paths resolve against the working directory, as `path` does.

Labels may then be class indices or class names. A value is looked up as a name first, so a class
list ["1", "2", "3"] maps "1" to index 0; a value that is not a name but reads as an integer is an
index. A label that is neither (or an index outside the class list) means the class list and the data
disagree: that is a configuration error, raised when the source is built, naming the value, where it
occurs and the valid names, not a skipped sample, because silently dropping the samples of one class
would bias every accuracy measured on the rest. A blank label is missing data and stays a counted
`bad_label` skip, as in a source without class names.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydantic

from coalign.data.sources.base import SampleError, ZeroShotTask
from coalign.registry import ConfigError, StrictModel, suggest

DEFAULT_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}."]
ClassNames = list[str] | str  # a list, or the path of a CLIP_benchmark classnames JSON
SHOWN = 20  # class names listed in an error message


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _listing(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:SHOWN])
    return shown + (f", ... ({len(names)} classes)" if len(names) > SHOWN else "")


def read_name_list(value: ClassNames, dataset_name: str | None, what: str) -> list[str]:
    """A list as it is, or the list a CLIP_benchmark JSON file holds under `dataset_name` (or its only
    key, or the file itself when it is a list). ValueError, one line, when there is none."""
    if not isinstance(value, str):
        names = list(value)
    else:
        path = Path(value).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{what} file '{path}' does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{what} file '{path}' is not readable JSON: {err}") from None
        if isinstance(data, dict):
            keys = sorted(data)
            if dataset_name is None and len(keys) == 1:
                dataset_name = keys[0]
            if dataset_name is None:
                raise ValueError(
                    f"{what} file '{path}' holds several datasets; pick one with dataset_name: "
                    f"{', '.join(keys[:SHOWN])}"
                )
            if dataset_name not in data:
                raise ValueError(
                    f"{what} file '{path}' has no dataset '{dataset_name}'{suggest(dataset_name, keys)}; "
                    f"it has: {', '.join(keys[:SHOWN]) or '(none)'}"
                )
            data = data[dataset_name]
        names = data
        if not isinstance(names, list):
            found = type(names).__name__
            raise ValueError(f"{what} file '{path}': expected a list of strings, found a {found}")
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"{what} must be a non-empty list of non-empty strings")
    return names


def normalise_template(template: str) -> str:
    """CLIP_benchmark writes `{c}` for the class name, coalign `{}`: the same template, one spelling."""
    out = template.replace("{c}", "{}")
    try:
        out.format("x")
    except (IndexError, KeyError, ValueError):
        raise ValueError(f"template {template!r} may hold only '{{}}' or '{{c}}' placeholders") from None
    if "{}" not in out:
        raise ValueError(f"template {template!r} has no '{{}}' or '{{c}}' placeholder for the class name")
    return out


class ZeroShotOptions(StrictModel):
    """The zero-shot options of a labelled source (see the module docstring)."""

    classnames: ClassNames | dict[str, ClassNames] | None = None
    templates: ClassNames | None = None  # default: DEFAULT_TEMPLATES
    dataset_name: str | None = None  # the key in CLIP_benchmark's classnames / templates JSON files

    def label_key_names(self) -> list[str]:
        """The label keys of the source (what `classnames` may name)."""
        raise NotImplementedError

    @pydantic.model_validator(mode="after")
    def _check_zero_shot(self) -> ZeroShotOptions:
        self.zero_shot_classes()  # reads the files now, so a bad one fails when the recipe or suite loads
        return self

    def zero_shot_classes(self) -> dict[str, list[str]]:
        """{label key: class names}; ValueError (one line) for a bad option or file."""
        keys = self.label_key_names()
        picks = "dataset_name picks a key in a classnames/templates JSON file"
        if self.classnames is None:
            if self.templates is not None:
                raise ValueError("templates are given but no classnames to fill them with")
            if self.dataset_name is not None:
                raise ValueError(f"{picks}; no classnames are given")
            return {}
        files = [self.templates, *(self.classnames.values() if isinstance(self.classnames, dict) else [])]
        if self.dataset_name is not None and not any(isinstance(v, str) for v in [self.classnames, *files]):
            raise ValueError(f"{picks}; neither is a file")
        if isinstance(self.classnames, dict):
            per_key = self.classnames
            for key in per_key:
                if key not in keys:
                    raise ValueError(
                        f"classnames: '{key}' is not a label key{suggest(key, keys)}; "
                        f"label keys: {', '.join(keys) or '(none)'}"
                    )
        elif len(keys) == 1:
            per_key = {keys[0]: self.classnames}
        else:
            raise ValueError(
                f"classnames as one list needs exactly one label key, this source has "
                f"{len(keys)} ({', '.join(keys) or 'none'}); give {{label key: classnames}} instead"
            )
        self.zero_shot_templates()
        name = self.dataset_name
        return {key: read_name_list(v, name, f"classnames '{key}'") for key, v in per_key.items()}

    def zero_shot_templates(self) -> list[str]:
        if self.templates is None:
            return list(DEFAULT_TEMPLATES)
        names = read_name_list(self.templates, self.dataset_name, "templates")
        try:
            return [normalise_template(t) for t in names]
        except ValueError as err:
            raise ValueError(f"templates: {err}") from None

    def class_labels(self, extra: dict[str, list[str]] | None = None) -> ClassLabels:
        """The class lists (`extra`: lists the data itself names, e.g. a Hugging Face ClassLabel, for
        keys without classnames) as a `ClassLabels`; ConfigError for a bad option or file."""
        try:
            classes = {**(extra or {}), **self.zero_shot_classes()}
            return ClassLabels(classes, self.zero_shot_templates())
        except ValueError as err:
            raise ConfigError(str(err)) from None


class ClassLabels:
    """Label keys with class names: maps each label value to its class index, and gives the tasks."""

    def __init__(self, classes: dict[str, list[str]], templates: list[str]):
        self.classes = classes
        self.templates = templates
        self._index = {k: {n: i for i, n in enumerate(names)} for k, names in classes.items()}

    def index(self, key: str, value: Any) -> int | None:
        """The class index of `value` under `key` (a class name, or an integer index in range), else
        None. Keys without class names take integers only. Blank values are the caller's business."""
        names = self._index.get(key)
        if isinstance(value, str):
            if names is not None and value in names:
                return names[value]
            value = value.strip()
            if names is not None and value in names:
                return names[value]
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                return None
            i = int(value)
        except (TypeError, ValueError):
            return None
        if names is not None and not 0 <= i < len(names):
            return None
        return i

    def label(self, key: str, value: Any, where: str) -> int:
        """The class index of one sample's label; SampleError("bad_label") when it has none usable."""
        found = None if _blank(value) else self.index(key, value)
        if found is None:
            hint = "" if key in self.classes else " (give classnames to map names to indices)"
            raise SampleError("bad_label", f"{where}: label '{key}' is {value!r}, not an integer{hint}")
        return found

    def check(self, key: str, values: Iterable[tuple[str, Any]], source: str) -> None:
        """ConfigError naming the first unknown label of `key` among (where, value) pairs, the count of
        unknown values and the valid names. Only keys with class names are checked; blanks pass."""
        names = self.classes.get(key)
        if names is None:
            return
        unknown: dict[str, str] = {}  # value -> where it first occurs
        for where, value in values:
            if not _blank(value) and self.index(key, value) is None:
                unknown.setdefault(str(value), where)
        if unknown:
            value, where = next(iter(unknown.items()))
            more = f" ({len(unknown)} unknown values in all)" if len(unknown) > 1 else ""
            raise ConfigError(
                f"{source} {where}: label {value!r} (key '{key}') is not one of the {len(names)} classnames"
                f"{suggest(value, names)}{more}; valid: {_listing(names)} (or an index 0..{len(names) - 1})"
            )

    def tasks(self) -> dict[str, ZeroShotTask]:
        return {k: ZeroShotTask(k, list(names), list(self.templates)) for k, names in self.classes.items()}
