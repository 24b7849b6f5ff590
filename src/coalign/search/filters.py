"""Search restricted by labels: `{"shape": 2, "color": [0, 3]}` keeps the items whose `shape` label is 2
and whose `color` is 0 or 3 (every named label must match; a list means any of its values).

The labels column (JSON per row) is parsed once into integer codes per label, so a filter costs a
few vectorised comparisons, not a JSON parse per row. A filter that keeps few items (<= PREFILTER_MAX)
is answered exactly over just those rows (pre-filtered candidates: an IVF or HNSW index would have
to search far past its tuned settings to find k of them); a larger one goes to FAISS with an
IDSelectorBitmap in the search parameters, the index's own nprobe / efSearch / k_factor kept.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import faiss
import numpy as np

from coalign.registry import ConfigError

PREFILTER_MAX = 20_000
Scalar = int | str


def parse_filter(spec: Any) -> dict[str, tuple[Scalar, ...]]:
    """{label: allowed values}; refuses what is not a mapping of label names to values or lists."""
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(
            f"a filter is a non-empty mapping of label names to values, e.g. {{'shape': 2}}; got {spec!r}"
        )
    out = {}
    for name, value in spec.items():
        values = value if isinstance(value, list | tuple) else [value]
        ok = values and all(isinstance(v, int | str) and not isinstance(v, bool) for v in values)
        if not isinstance(name, str) or not ok:
            raise ConfigError(
                f"filter '{name}': give a label value (integer or string) or a non-empty list of them; "
                f"got {value!r}"
            )
        out[name] = tuple(values)
    return out


class LabelIndex:
    """Each label's value per row, as integer codes (-1: the row has no such label)."""

    def __init__(self, labels_json: list[str | None]):
        parsed = [json.loads(s or "{}") for s in labels_json]
        self.n = len(parsed)
        self.codes: dict[str, np.ndarray] = {}
        self.vocab: dict[str, dict[Any, int]] = {}
        for name in sorted({key for row in parsed for key in row}):
            vocab: dict[Any, int] = {}
            codes = np.full(self.n, -1, dtype=np.int32)
            for i, row in enumerate(parsed):
                if name in row:
                    codes[i] = vocab.setdefault(_hashable(row[name]), len(vocab))
            self.codes[name], self.vocab[name] = codes, vocab
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def rows(self, spec: Any) -> np.ndarray:
        """The sorted rows that match every condition of the filter."""
        conditions = parse_filter(spec)
        key = tuple(sorted((k, tuple(sorted(map(repr, v)))) for k, v in conditions.items()))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        unknown = [name for name in conditions if name not in self.codes]
        if unknown:
            raise ConfigError(
                f"no label '{unknown[0]}' in this index; labels: {', '.join(self.codes) or 'none'}"
            )
        mask = np.ones(self.n, dtype=bool)
        for name, values in conditions.items():
            wanted = [self.vocab[name][v] for v in values if v in self.vocab[name]]
            mask &= np.isin(self.codes[name], wanted)
        rows = np.flatnonzero(mask)
        self._cache[key] = rows
        if len(self._cache) > 64:
            self._cache.popitem(last=False)
        return rows


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value


def search_parameters(index: faiss.Index, sel: faiss.IDSelector) -> faiss.SearchParameters:
    """Search parameters carrying `sel` and the index's own settings (a bare SearchParametersIVF would
    reset nprobe to 1)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        base = search_parameters(index.base_index, sel)
        params = faiss.IndexRefineSearchParameters(k_factor=index.k_factor, base_index_params=base)
        params.keep = base  # the Python object must outlive the search
        return params
    if isinstance(index, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=sel, nprobe=index.nprobe)
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=sel, efSearch=index.hnsw.efSearch)
    return faiss.SearchParameters(sel=sel)


def selector_search(index: faiss.Index, q: np.ndarray, k: int, rows: np.ndarray, n: int):
    """(scores, rows) of `index` restricted to `rows` (sorted) by an IDSelectorBitmap over n items."""
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    bitmap = np.packbits(mask, bitorder="little")  # faiss reads bit i at byte i >> 3, bit i & 7
    sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bitmap))
    params = search_parameters(index, sel)
    return index.search(q, k, params=params)
