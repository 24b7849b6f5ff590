"""Curate image-text pairs (`coalign data filter`): rules, duplicates, and CLIP-score filtering with a
trained run, written as new shards (`data/pack.py`) with a report of what each rule removed.

Each sample is removed by the first of these rules that it fails, in this order, and counted under
that rule's name:

1. `unreadable`: the sample cannot be read, or has no image or no caption, or its image does not
   decode (the reasons are counted too: `corrupt_image`, `empty_caption`, ...);
2. caption rules on the first caption (the one evaluation and scoring encode): `caption_too_short`
   / `caption_too_long` (words, characters), `repeated_words` (the fraction of its words that repeat
   an earlier word of it, for captions of 4 words or more: "buy buy buy shoes"), `few_letters` (the
   fraction of its characters that are letters), `wrong_script` (the fraction of its letters in the
   Unicode script asked for, e.g. LATIN, CYRILLIC, CJK, read from the characters' Unicode names),
   `repeated_caption` (boilerplate: a caption, compared lower-cased, that more than
   `max_caption_count` samples carry);
3. image rules, on the decoded size: `image_too_small` (shorter side), `extreme_aspect` (longer over
   shorter side);
4. `exact_duplicate`: the same pixels as an earlier sample (SHA-1 of the decoded RGB image and its
   size); the first in source order is kept;
5. `near_duplicate`: image embeddings with cosine >= `near_duplicates` to a kept sample (a FAISS
   inner-product range search over L2-normalised embeddings); the best-scoring copy is kept;
6. `low_score`: the pair's cosine (image embedding . caption embedding, the CLIP score) below
   `threshold`, or outside the best `keep_fraction` of the samples left by rules 1-5.

Rules 5 and 6 need a model (`load_run`): samples are embedded with its `encode`, the same function
evaluation and search use. Nothing is embedded for a sample an earlier per-sample rule removed.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from coalign.data.filter_rules import RULES, Rules, caption_rule, image_rule
from coalign.data.pack import pack
from coalign.data.sample import first_caption
from coalign.data.shards import to_buffer
from coalign.data.sources.base import SampleError, SkipCounter, Source
from coalign.data.transforms.image import decode_image
from coalign.io import atomic_write_bytes, atomic_write_json, atomic_write_text

REPORT = "filter_report.json"
REMOVED = "removed.jsonl"
HISTOGRAM = "scores.png"


class Examined(NamedTuple):
    index: int
    rule: str | None  # the first per-sample rule failed, or None
    reason: str  # for an unreadable sample: its SampleError reason
    digest: bytes  # SHA-1 of the decoded pixels
    caption: str  # the first caption, lower-cased: boilerplate counts
    inputs: tuple[torch.Tensor, torch.Tensor] | None  # (image, text) for the model


class _Examine(torch.utils.data.Dataset):
    """Source index -> `Examined` (the per-sample rules; model inputs for a sample that passes them)."""

    def __init__(self, source: Source, rules: Rules, transforms: dict[str, Any] | None):
        self.source, self.rules, self.transforms = source, rules, transforms

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Examined:
        try:
            sample = self.source[index]
            text = first_caption(sample.get("text"))
            if text is None:
                raise SampleError("empty_caption")
            if sample.get("image") is None:
                raise SampleError("missing_image")
            decode = self.transforms["image"].decode if self.transforms else decode_image
            image = decode(sample["image"])
        except SampleError as err:
            return Examined(index, "unreadable", err.reason, b"", "", None)
        rule = caption_rule(text, self.rules) or image_rule(*image.size, self.rules)
        digest = hashlib.sha1(repr(image.size).encode() + image.tobytes()).digest()
        inputs = None
        if rule is None and self.transforms:
            try:
                rng = np.random.default_rng(index)
                inputs = (self.transforms["image"](image, rng), self.transforms["text"](text, rng))
            except SampleError as err:
                return Examined(index, "unreadable", err.reason, b"", "", None)
        return Examined(index, rule, "", digest, " ".join(text.lower().split()), inputs)


def _as_list(batch: list) -> list:
    return batch


@torch.no_grad()
def examine(
    source: Source, rules: Rules, run: Any | None, batch_size: int, workers: int, progress: bool
) -> tuple[list[str | None], dict[int, str], list[bytes], list[str], np.ndarray, np.ndarray | None]:
    """Pass 1 over `source`: per-sample rules, {index: reason} of the unreadable samples, pixel
    digests, captions, and (with `run`) each pair's score (N,) and image embedding (N, E) (NaN /
    zeros where nothing was embedded)."""
    n = len(source)
    embed = run is not None and rules.embeds
    transforms = run.transforms if embed else None
    device = next(run.model.parameters()).device if embed else None
    rule: list[str | None] = [None] * n
    digests: list[bytes] = [b""] * n
    texts: list[str] = [""] * n
    scores = np.full(n, np.nan, dtype=np.float32)
    images = np.zeros((n, run.model.embed_dim), dtype=np.float32) if embed else None
    unreadable: dict[int, str] = {}
    loader = torch.utils.data.DataLoader(
        _Examine(source, rules, transforms), batch_size=batch_size, num_workers=workers, collate_fn=_as_list
    )
    bar = tqdm(total=n, desc="examining", unit="sample", disable=not progress, dynamic_ncols=True)
    for batch in loader:
        for item in batch:
            rule[item.index], digests[item.index], texts[item.index] = item.rule, item.digest, item.caption
            if item.rule == "unreadable":
                unreadable[item.index] = item.reason
        ready = [item for item in batch if item.inputs is not None]
        if ready:
            x = torch.stack([item.inputs[0] for item in ready]).to(device)
            t = torch.stack([item.inputs[1] for item in ready]).to(device)
            a = run.model.encode("image", x).float().cpu().numpy()  # (b, E), unit norm
            b = run.model.encode("text", t).float().cpu().numpy()
            rows = [item.index for item in ready]
            images[rows] = a
            scores[rows] = (a * b).sum(axis=1)
        bar.update(len(batch))
        bar.set_postfix(removed=sum(r is not None for r in rule), refresh=False)
    bar.close()
    return rule, unreadable, digests, texts, scores, images


def near_duplicates(
    vectors: np.ndarray, order: np.ndarray, cosine: float, chunk: int = 4096
) -> dict[int, int]:
    """{row: the kept row it duplicates} for rows of `vectors` (unit norm) taken greedily in `order`:
    a row is kept unless an earlier kept row has cosine >= `cosine` with it."""
    import faiss

    x = np.ascontiguousarray(vectors[order], dtype=np.float32)  # position p is row order[p]
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    duplicate_of: dict[int, int] = {}
    for start in range(0, len(x), chunk):
        # faiss keeps inner products above the radius; the small margin makes it ">= cosine"
        lims, _, found = index.range_search(x[start : start + chunk], cosine - 1e-6)
        for q in range(len(lims) - 1):
            p = start + q
            if int(order[p]) in duplicate_of:
                continue  # a removed row removes nothing
            for other in found[lims[q] : lims[q + 1]]:
                if other > p and int(order[other]) not in duplicate_of:
                    duplicate_of[int(order[other])] = int(order[p])
    return duplicate_of


def decide(
    rule: list[str | None],
    digests: list[bytes],
    texts: list[str],
    scores: np.ndarray,
    images: np.ndarray | None,
    rules: Rules,
) -> tuple[dict[int, int], float | None]:
    """Apply the rules that need the whole set (boilerplate, duplicates, score) to `rule` in place;
    return {removed duplicate: the sample it duplicates} and the score cut (None without one)."""
    if rules.max_caption_count is not None:
        counts = Counter(t for r, t in zip(rule, texts, strict=True) if r is None)
        for i, t in enumerate(texts):
            if rule[i] is None and counts[t] > rules.max_caption_count:
                rule[i] = "repeated_caption"
    duplicate_of: dict[int, int] = {}
    if rules.exact_duplicates:
        first: dict[bytes, int] = {}
        for i, d in enumerate(digests):
            if rule[i] is None:
                if d in first:
                    rule[i], duplicate_of[i] = "exact_duplicate", first[d]
                else:
                    first[d] = i
    left = np.array([i for i, r in enumerate(rule) if r is None], dtype=np.int64)
    if rules.near_duplicates is not None and len(left):
        best_first = left[np.lexsort((left, -scores[left]))]  # by score, high first; ties by index
        found = near_duplicates(images, best_first, rules.near_duplicates)
        for i in found:
            rule[i] = "near_duplicate"
        duplicate_of |= found
        left = np.array([i for i in left if i not in found], dtype=np.int64)
    cut = rules.threshold
    if rules.keep_fraction is not None and len(left):
        keep = max(1, math.floor(rules.keep_fraction * len(left) + 1e-9))
        ranked = left[np.lexsort((left, -scores[left]))]
        for i in ranked[keep:]:
            rule[i] = "low_score"
        cut = float(scores[ranked[keep - 1]])
    elif cut is not None:
        for i in left:
            if scores[i] < cut:
                rule[i] = "low_score"
    return duplicate_of, cut


def histogram(scores: np.ndarray, cut: float | None, path: Path | None, bins: int = 40) -> dict[str, Any]:
    """The scores' histogram (and, with `path`, its plot with the cut marked as a PNG)."""
    counts, edges = np.histogram(
        scores, bins=bins, range=(float(scores.min()), float(scores.max())) if len(scores) else (0, 1)
    )
    if path is not None and len(scores):
        from coalign.evaluate.report_plots import figure

        fig = figure(figsize=(6.4, 3.6))
        ax = fig.add_subplot()
        ax.hist(scores, bins=edges, color="#4C72B0")
        if cut is not None:
            ax.axvline(cut, color="#C44E52", linestyle="--", label=f"cut {cut:.3f}")
            ax.legend()
        ax.set_xlabel("cosine (image, caption)")
        ax.set_ylabel("samples")
        ax.set_title(f"CLIP score of {len(scores)} pairs")
        fig.subplots_adjust(left=0.12, bottom=0.15, right=0.97, top=0.9)
        atomic_write_bytes(path, to_buffer(lambda buf: fig.savefig(buf, format="png", dpi=100)))
    return {"counts": counts.tolist(), "edges": [round(float(e), 6) for e in edges]}


def filter_source(
    source: Source,
    out: Path,
    rules: Rules,
    run: Any | None = None,
    *,
    batch_size: int = 256,
    workers: int = 0,
    shard_size: int | None = 10_000,
    max_shard_bytes: int | None = None,
    progress: bool = True,
    spec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Filter `source` by `rules` (scored with the `LoadedRun` `run`) into shards in the new or empty
    folder `out`, with OUT/filter_report.json, OUT/removed.jsonl (every removed sample: index, rule,
    score, the sample it duplicates) and OUT/scores.png; return the report."""
    out = Path(out)
    rules.check(run is not None)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"'{out}' exists and is not an empty folder; filtered shards go into a new or empty one"
        )
    if run is not None and not {"image", "text"} <= set(run.model.modalities):
        raise ValueError(
            f"--model needs image and text towers; this run has {', '.join(run.model.modalities)}"
        )
    started = time.perf_counter()
    rule, unreadable, digests, texts, scores, images = examine(
        source, rules, run, batch_size, workers, progress
    )
    duplicate_of, cut = decide(rule, digests, texts, scores, images, rules)
    kept = [i for i, r in enumerate(rule) if r is None]
    removed = Counter(r for r in rule if r is not None)
    rows = SkipCounter()
    for i, r in enumerate(rule):
        if r is not None:
            rows.skip(r, i)
    scored = np.array([i for i, r in enumerate(rule) if r in (None, "low_score")], dtype=np.int64)
    report: dict[str, Any] = {
        "source": spec or {},
        "model": str(run.checkpoint.absolute()) if run is not None else None,
        "rules": asdict(rules),
        "samples": len(source),
        "kept": len(kept),
        "removed": {r: removed[r] for r in RULES if removed[r]},
        "removed_rows": rows.record()["rows"],
        "unreadable": dict(sorted(Counter(unreadable.values()).items())),
    }
    if run is not None and rules.embeds:
        s = scores[scored] if len(scored) else np.zeros(0, np.float32)
        report["score"] = {
            "cut": cut,
            "scored": len(s),
            "mean": round(float(s.mean()), 6) if len(s) else None,
            "kept_mean": round(float(scores[kept].mean()), 6) if kept else None,
        }
    manifest = pack(
        source,
        out,
        shard_size=shard_size,
        max_shard_bytes=max_shard_bytes,
        workers=workers,
        progress=progress,
        spec=spec,
        indices=kept,
        extra={"filter": {"report": REPORT, "kept": len(kept), "removed": report["removed"]}},
    )
    if "score" in report:  # drawn after packing: OUT had to be empty for it
        report["score"]["histogram"] = histogram(scores[scored], cut, out / HISTOGRAM)
    report["packed"] = manifest["samples"]
    report["skipped_when_packed"] = manifest["skipped"]["counts"]
    report["seconds"] = round(time.perf_counter() - started, 3)
    lines = []
    for i, r in enumerate(rule):
        if r is not None:
            record = {
                "index": i,
                "rule": r,
                "score": None if np.isnan(scores[i]) else round(float(scores[i]), 6),
            }
            if r == "unreadable":
                record["reason"] = unreadable[i]
            if i in duplicate_of:
                record["duplicate_of"] = duplicate_of[i]
            lines.append(json.dumps(record))
    atomic_write_text(out / REMOVED, "".join(line + "\n" for line in lines))
    atomic_write_json(out / REPORT, report)
    return report
