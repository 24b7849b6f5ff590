"""The sample-dict vocabulary, in one place: what a sample and a batch hold, and how to read them.

A sample is a plain dict keyed by modality name (`image`, `text`, `audio`, ...; `<modality>@<view>`
for another view of a modality) plus the metadata in `META_KEYS`. A batch is the same keys after
collate: each modality's tensor covers only the rows that have it, `batch["present"][key]` says
which (see collate.py). Everything that reads captions, views or present rows imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

Sample = dict[str, Any]

# Sample and batch keys that are not modalities (a manifest may not name a modality after them).
META_KEYS = ("id", "label", "present", "skipped", "skipped_rows")


def base_modality(key: str) -> str:
    """'image@v2' -> 'image'. A key `<modality>@<view>` is another view of that modality: it is read
    from the same raw value, transformed by its own transform and encoded by the same tower."""
    return key.split("@", 1)[0]


# ------------------------------------------------------------------------------------------ captions


def clean_text(text: str) -> str:
    """`text` with every lone surrogate (U+D800..U+DFFF not forming a pair) replaced by U+FFFD.

    JSON may spell one (`"\\ud800"`) and Python then holds a str that no UTF-8 consumer accepts: the
    tokenizer, parquet and the HTTP API would all raise on it. The rest of the caption is good text,
    so the one bad code point is replaced (as a UTF-8 decoder does with a bad byte) rather than the
    caption dropped. Two surrogates that do form a pair become the character they spell.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def captions(value: Any) -> list[str]:
    """The usable captions of a raw text value (a string or a list of them), cleaned: non-strings and
    blank strings are left out, lone surrogates replaced (`clean_text`). [] means: no caption."""
    texts = [value] if isinstance(value, str) else list(value) if isinstance(value, list | tuple) else []
    return [clean_text(t) for t in texts if isinstance(t, str) and t.strip()]


def first_caption(value: Any) -> str | None:
    """The first usable caption of a raw text value (what evaluation and `embed` encode), or None."""
    found = captions(value)
    return found[0] if found else None


# ------------------------------------------------------------------------------ rows present in keys


def present_rows(batch: dict[str, Any], keys: Sequence[str]) -> list[torch.Tensor | None]:
    """For each key, a boolean selector into that key's rows for the samples that have every key.

    A key's tensor covers only the rows where it is present (`batch["present"][key]`, (B,) bool), so
    the shared rows are picked out of each key's rows separately: selector k has one entry per row of
    key k. None means "take all its rows" (no sample lacks any of the keys). A key without a present
    mask is taken to be present in every row of the batch.
    """
    present = batch.get("present", {})
    masks = [present.get(k) for k in keys]
    known = [m for m in masks if m is not None]
    if not known or all(bool(m.all()) for m in known):
        return [None] * len(keys)
    every = known[0]
    for m in known[1:]:
        every = every & m  # (B,)
    return [every if m is None else every[m] for m in masks]


def select_present(
    batch: dict[str, Any], keys: Sequence[str], values: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """`values[k]` (rows of key k, (B_k, ...)) cut to the samples that have every key: one (M, ...)
    per key, row-aligned. A value whose row count does not match its key's present mask is an error."""
    out = []
    for key, value, sel in zip(keys, values, present_rows(batch, keys), strict=True):
        if sel is not None and sel.shape[0] != value.shape[0]:
            raise ValueError(
                f"'{key}' has {value.shape[0]} feature rows but its present mask selects from "
                f"{sel.shape[0]}; features must cover exactly the rows where '{key}' is present"
            )
        out.append(value if sel is None else value[sel.to(value.device)])
    return tuple(out)
