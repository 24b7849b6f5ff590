"""Collate transformed samples into a batch dict; skipped samples are counted, not fatal.

batch = {
    "<modality>": tensor (B_m, ...) stacked over the samples that have that modality,
    "present": {"<modality>": bool (B,)}  which rows of the batch have it (all True when none is missing),
    "label": {"<key>": long (B,)}        when every sample carries that label,
    "id": [str] * B,
    "skipped": {"<reason>": int}          how many samples were dropped from this batch, by reason,
    "skipped_rows": {"<reason>": [int]}   and their source indices (`SkipCounter.from_batch` reads both),
}

The skip record is plain dicts, not the SkipCounter: the DataLoader passes each batch through
torch's `default_convert` (and `pin_memory` when it is on), which rebuilds a mapping as
`copy(m).update(converted items)`; for a Counter, `update` adds, so every count came out doubled.
"""

from __future__ import annotations

from typing import Any

import torch

from coalign.data.sample import META_KEYS, Sample
from coalign.data.sources.base import SkipCounter


def collate(
    samples: list[Sample], modalities: list[str], skipped: SkipCounter | None = None
) -> dict[str, Any]:
    batch: dict[str, Any] = {"id": [s.get("id", "") for s in samples], "present": {}}
    for m in modalities:
        mask = torch.tensor([s.get(m) is not None for s in samples], dtype=torch.bool)
        if mask.any():
            batch[m] = torch.stack([s[m] for s in samples if s.get(m) is not None])
            batch["present"][m] = mask
    labels = [s.get("label") or {} for s in samples]
    keys = set.intersection(*(set(lab) for lab in labels)) if labels else set()
    batch["label"] = {k: torch.tensor([lab[k] for lab in labels], dtype=torch.long) for k in sorted(keys)}
    batch |= (skipped if skipped is not None else SkipCounter()).as_batch()
    return batch


def batch_size(batch: dict[str, Any]) -> int:
    return len(batch["id"])


def split_batch(batch: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """Cut a collated batch into `parts` contiguous micro-batches of (nearly) equal size, in order.

    A key's tensor covers only the rows that have it, so the rows of micro-batch [s, e) are, for
    each key, those of its present samples among s..e-1 (a prefix count of the mask). Concatenating
    the micro-batches' rows key by key gives back the batch's rows: GradCache relies on it."""
    n = batch_size(batch)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split a batch of {n} samples into {parts} parts")
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    present = batch.get("present", {})
    out = []
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        part: dict[str, Any] = {"id": batch["id"][s:e], "present": {}, "label": {}}
        for key, value in batch.items():
            if key in META_KEYS or not isinstance(value, torch.Tensor):
                continue
            mask = present.get(key)
            if mask is None:
                part[key] = value[s:e]
            else:
                before, upto = int(mask[:s].sum()), int(mask[:e].sum())
                if upto > before:
                    part[key] = value[before:upto]
                    part["present"][key] = mask[s:e]
        part["label"] = {k: v[s:e] for k, v in batch.get("label", {}).items()}
        part["skipped"], part["skipped_rows"] = {}, {}
        out.append(part)
    return out
