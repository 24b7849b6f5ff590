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

from coalign.data.sample import Sample
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
