"""Tabular transform: a record {field: value} (or its JSON text) -> one float32 row of fixed fields.

The row is `numeric` values (standardised with the mean and std that `fit` measured on the training
source and saved to `tabular_stats.json` in the run folder) followed by `categorical` fields as
category indices stored as floats. The encoder decides what a missing value means:
- a missing numeric value (absent, None, "", "nan", "na", "n/a", "null", "?") becomes NaN, which the
  encoder replaces by a learnt "missing" embedding;
- a categorical value outside the field's list, or missing, becomes index len(values), "unknown".
`describe()` reports {"numeric": n, "categories": [len(values) + 1 per field]}, the +1 being
"unknown". A record with none of the configured fields is a bad sample ("missing_tabular"), and a
non-number in a numeric field one too ("corrupt_tabular"): a typo should not quietly become NaN.

Training may add Gaussian noise (`noise`, in standard deviations) to numeric values and blank each
field with chance `drop_prob` (a numeric to NaN, a categorical to unknown), so that the model does
not lean on any single field.

The defaults are the built-in world's fields; a recipe for other data names its own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import torch

from coalign.data.sources.base import SampleError, Source
from coalign.data.transforms.base import Transform
from coalign.data.world_modalities import TABULAR_CATEGORICAL, TABULAR_NUMERIC
from coalign.registry import TRANSFORMS, StrictModel

STATS_FILE = "tabular_stats.json"
MISSING_WORDS = {"", "nan", "na", "n/a", "null", "none", "?"}


class TabularConfig(StrictModel):
    numeric: list[str] = pydantic.Field(default_factory=lambda: list(TABULAR_NUMERIC))
    categorical: dict[str, list[str]] = pydantic.Field(
        default_factory=lambda: {k: list(v) for k, v in TABULAR_CATEGORICAL.items()}
    )
    fit_samples: int = pydantic.Field(2000, ge=1)  # training records to measure mean and std on
    noise: float = pydantic.Field(0.0, ge=0.0)  # training only: Gaussian noise on standardised numerics
    drop_prob: float = pydantic.Field(0.0, ge=0.0, lt=1.0)  # training only: chance to blank each field

    @classmethod
    def tiny(cls) -> dict:
        return {"fit_samples": 64}

    @pydantic.model_validator(mode="after")
    def _check_fields(self) -> TabularConfig:
        if not self.numeric and not self.categorical:
            raise ValueError("needs at least one field in 'numeric' or 'categorical'")
        fields = [*self.numeric, *self.categorical]
        repeated = sorted({f for f in fields if fields.count(f) > 1})
        if repeated:
            raise ValueError(f"fields listed twice: {', '.join(repeated)}")
        for name, values in self.categorical.items():
            if not values or len(set(values)) != len(values):
                raise ValueError(f"categorical field '{name}' needs a non-empty list of distinct values")
        return self


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in MISSING_WORDS


def _category_key(value: Any) -> str:
    """The string a value is matched by: 1.0 (a CSV's number) matches the category "1"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def parse_record(value: Any) -> dict[str, Any]:
    if isinstance(value, str | bytes | bytearray):
        if not value.strip():
            raise SampleError("missing_tabular", "empty record")
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SampleError("corrupt_tabular", f"not JSON: {err}") from None
    if not isinstance(value, dict):
        raise SampleError("corrupt_tabular", f"a record must be a dict, got {type(value).__name__}")
    return value


@TRANSFORMS.register("tabular")
class TabularTransform(Transform):
    Config = TabularConfig
    modality = "tabular"
    shared_with_views = ("numeric", "categorical", "fit_samples")

    def __init__(self, cfg: TabularConfig | None = None, **kwargs):
        self.cfg = cfg or TabularConfig(**kwargs)
        self.mean: np.ndarray | None = None  # (len(numeric),)
        self.std: np.ndarray | None = None
        self.lookup = {f: {v: i for i, v in enumerate(vals)} for f, vals in self.cfg.categorical.items()}

    # ----------------------------------------------------------------------------- fitting and reading
    def raw_numeric(self, record: dict[str, Any]) -> np.ndarray:
        """(len(numeric),) float64 unstandardised values, NaN where missing."""
        out = np.full(len(self.cfg.numeric), np.nan)
        for i, field in enumerate(self.cfg.numeric):
            value = record.get(field)
            if _is_missing(value):
                continue
            try:
                out[i] = float(value)
            except (TypeError, ValueError):
                raise SampleError("corrupt_tabular", f"field '{field}': {value!r} is not a number") from None
            if math.isinf(out[i]):
                raise SampleError("corrupt_tabular", f"field '{field}' is infinite")
        return out

    def fit(self, source: Source, run_dir: Path | None) -> None:
        rows = []
        for i in range(min(len(source), self.cfg.fit_samples)):
            try:
                raw = source[i].get("tabular")
                if raw is not None:
                    rows.append(self.raw_numeric(parse_record(raw)))
            except SampleError:
                continue
        if not rows:
            raise ValueError("cannot fit the tabular transform: the training source has no readable records")
        table = np.stack(rows) if self.cfg.numeric else np.zeros((len(rows), 0))  # (R, len(numeric))
        seen = np.isfinite(table).any(axis=0)
        if not seen.all():
            unseen = [f for f, ok in zip(self.cfg.numeric, seen, strict=True) if not ok]
            raise ValueError(
                f"tabular numeric fields {unseen} have no values in the first {len(rows)} training records; "
                "check the field names in data.transforms.<modality>.numeric"
            )
        with np.errstate(invalid="ignore"):
            self.mean = np.nanmean(table, axis=0)
            std = np.nanstd(table, axis=0)
        self.std = np.where(std > 1e-12, std, 1.0)  # a constant field: centre only
        if run_dir is not None:
            self.save(run_dir)

    def save(self, run_dir: Path) -> None:
        if self.mean is None or self.std is None:
            raise RuntimeError("nothing to save: call fit() first")
        pairs = zip(self.cfg.numeric, self.mean, self.std, strict=True)
        stats = {f: {"mean": float(m), "std": float(s)} for f, m, s in pairs}
        (Path(run_dir) / STATS_FILE).write_text(json.dumps({"numeric": stats}, indent=2))

    def load(self, run_dir: Path) -> None:
        path = Path(run_dir) / STATS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"tabular statistics '{path}' not found; was the transform fitted?")
        stats = json.loads(path.read_text())["numeric"]
        missing = [f for f in self.cfg.numeric if f not in stats]
        if missing:
            raise ValueError(f"'{path}' has no statistics for numeric fields {missing}; it has {list(stats)}")
        self.mean = np.array([stats[f]["mean"] for f in self.cfg.numeric], dtype=np.float64)
        self.std = np.array([stats[f]["std"] for f in self.cfg.numeric], dtype=np.float64)

    # ----------------------------------------------------------------------------- encoding
    def __call__(self, value: Any, rng: np.random.Generator) -> torch.Tensor:
        if self.mean is None or self.std is None:
            raise RuntimeError("the tabular transform has no statistics; call fit() or load()")
        record = parse_record(value)
        fields = [*self.cfg.numeric, *self.cfg.categorical]
        if not any(not _is_missing(record.get(f)) for f in fields):
            raise SampleError("missing_tabular", f"none of the fields {', '.join(fields)} has a value")
        numeric = (self.raw_numeric(record) - self.mean) / self.std  # (n,), NaN stays NaN
        categorical = np.array(
            [
                self.lookup[f].get(_category_key(record.get(f)), len(self.lookup[f]))
                if not _is_missing(record.get(f))
                else len(self.lookup[f])
                for f in self.cfg.categorical
            ],
            dtype=np.float64,
        )  # (m,)
        if self.train:
            if self.cfg.noise > 0:
                numeric = numeric + rng.normal(0.0, self.cfg.noise, size=numeric.shape)
            if self.cfg.drop_prob > 0:
                numeric[rng.random(numeric.shape) < self.cfg.drop_prob] = np.nan
                unknown = np.array([len(self.lookup[f]) for f in self.cfg.categorical], dtype=np.float64)
                drop = rng.random(categorical.shape) < self.cfg.drop_prob
                categorical = np.where(drop, unknown, categorical)
        return torch.from_numpy(np.concatenate([numeric, categorical]).astype(np.float32))

    def describe(self) -> dict[str, Any]:
        categories = [len(values) + 1 for values in self.cfg.categorical.values()]  # +1: "unknown"
        return {"numeric": len(self.cfg.numeric), "categories": categories}
