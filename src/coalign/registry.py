"""One registry type for everything a recipe can name.

Sources, transforms, encoders, heads, fusion parts, objectives and evaluators all live in a
`Registry`. A registered entry may carry a pydantic `Config` class (as a class attribute);
`create(name, **cfg)` validates the keyword arguments against it before building, so a recipe with a
misspelt key fails at start.

Every part's Config may offer its tiny settings, a classmethod `tiny() -> dict` of options: the
smallest instance worth running. `--smoke` applies them to a recipe's sources and encoders
(`config.shrink`), and the tests over every registry (`tests/test_registries.py`) build each entry
from them, so a part added tomorrow is tested the day it is registered.

Registries fill themselves: the first lookup (`get`, `names`, `in`, ...) imports every module of
the part packages (`PACKAGES`), in sorted order so registration is deterministic. A new objective is
one new file in `coalign/objectives/` with one decorator, and nothing else to edit; no caller has to
import a "components" module first, and no module has to defer imports to dodge a cycle.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import pydantic

T = TypeVar("T")


class ConfigError(ValueError):
    """Bad configuration: the message names the field and what would be valid."""


def suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def format_validation_error(err: pydantic.ValidationError, prefix: str, model: type | None = None) -> str:
    """Turn a pydantic error into lines `a.b.c: what is wrong; what is valid`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        if e["type"] == "extra_forbidden":
            valid = _fields_at(model, e["loc"][:-1]) if model is not None else []
            key = str(e["loc"][-1])
            hint = suggest(key, valid)
            listing = f"; valid keys: {', '.join(sorted(valid))}" if valid else ""
            lines.append(f"{loc}: unknown key{hint}{listing}")
        else:
            # A validator's own message says what it got (pydantic prefixes it with "Value error, ");
            # a constraint's ("should be greater than 0") does not.
            own = e["type"] == "value_error"
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg}" if own else f"{loc}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def _fields_at(model: type, loc: tuple) -> list[str]:
    """The field names of the nested pydantic model found by following `loc` (best effort)."""
    cur: Any = model
    for part in loc:
        if isinstance(part, int) or cur is None:
            continue
        fields = getattr(cur, "model_fields", {})
        if part not in fields:
            return []
        cur = _model_in(fields[part].annotation)
    return list(getattr(cur, "model_fields", {}).keys())


def _model_in(annotation: Any) -> type | None:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


# Packages whose modules register parts; imported on the first lookup of any registry.
PACKAGES = (
    "coalign.data.sources",
    "coalign.data.transforms",
    "coalign.data",  # world.py
    "coalign.models.encoders",
    "coalign.models",  # heads.py, fusion.py, decoder.py
    "coalign.objectives",
    "coalign.evaluate",
)
_discovered = False


def discover() -> None:
    """Import every module of `PACKAGES` once, so every registry holds all its entries."""
    global _discovered
    if _discovered:
        return
    _discovered = True  # first: modules imported below may look up a registry themselves
    for package in PACKAGES:
        module = importlib.import_module(package)
        for info in sorted(pkgutil.iter_modules(module.__path__), key=lambda m: m.name):
            if not info.ispkg:
                importlib.import_module(f"{package}.{info.name}")


class Registry(Generic[T]):
    """Name -> constructor: `create("vit", width=192)` builds, `names()` lists, unknown names fail clearly."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(obj: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Callable[..., T]:
        discover()
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} '{name}'{suggest(name, self.names())}; "
                f"valid {self.kind}s: {', '.join(self.names())}"
            )
        return self._entries[name]

    def config_class(self, name: str) -> type[pydantic.BaseModel] | None:
        return getattr(self.get(name), "Config", None)

    def validate(self, name: str, cfg: dict[str, Any], where: str = "") -> pydantic.BaseModel | None:
        """Validate `cfg` against the entry's Config; raise ConfigError naming `where.field`."""
        cls = self.config_class(name)
        if cls is None:
            return None
        try:
            return cls(**cfg)
        except pydantic.ValidationError as err:
            raise ConfigError(format_validation_error(err, where, cls)) from None

    def create(self, name: str, where: str = "", **cfg: Any) -> T:
        parsed = self.validate(name, cfg, where or f"{self.kind} '{name}'")
        ctor = self.get(name)
        return ctor(parsed) if parsed is not None else ctor(**cfg)

    def tiny(self, name: str) -> dict[str, Any]:
        """The entry's tiny settings (its Config's `tiny()`), or {} when it offers none."""
        return dict(getattr(self.config_class(name), "tiny", dict)())

    @contextmanager
    def temporary(self, name: str, obj: Callable[..., T]) -> Iterator[Callable[..., T]]:
        """Register `obj` as `name` for the duration of a `with` block (tests: a toy entry that must
        not outlive the test), then remove it again, even when the block raises."""
        discover()  # first, so that discovery cannot register `name` itself inside the block
        self.register(name)(obj)
        try:
            yield obj
        finally:
            del self._entries[name]

    def names(self) -> list[str]:
        discover()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


class StrictModel(pydantic.BaseModel):
    """Base for every config: unknown keys are errors, values are validated on assignment."""

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True)


SOURCES: Registry = Registry("source")
TRANSFORMS: Registry = Registry("transform")
ENCODERS: Registry = Registry("encoder")
HEADS: Registry = Registry("head")
FUSION: Registry = Registry("fusion")  # parts that mix two towers' tokens (models/fusion.py)
# caption decoders that continue a text tower's tokens given an image tower's (models/decoder.py)
DECODERS: Registry = Registry("decoder")
OBJECTIVES: Registry = Registry("objective")
EVALUATORS: Registry = Registry("evaluator")

ALL = {
    "sources": SOURCES,
    "transforms": TRANSFORMS,
    "encoders": ENCODERS,
    "heads": HEADS,
    "fusion": FUSION,
    "decoders": DECODERS,
    "objectives": OBJECTIVES,
    "evaluators": EVALUATORS,
}
