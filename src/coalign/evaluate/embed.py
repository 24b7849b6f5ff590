"""Embed an evaluation source once: every non-text modality per sample, every caption per sample."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from coalign.data.sample import captions
from coalign.data.sources.base import SampleError, SkipCounter, Source, ZeroShotTask
from coalign.data.transforms.base import Transform
from coalign.models.model import MultimodalModel
from coalign.runtime import Runtime


@dataclass
class EmbeddedSet:
    """One evaluation source, embedded. Rows of every modality's embeddings are the kept samples
    (N of them); a sample that lacks a modality has a zero row there and False in `present[m]`."""

    name: str
    embeddings: dict[str, torch.Tensor]  # modality -> (N, E), normalised (zeros where absent)
    captions: torch.Tensor  # (T, E) every caption of every sample
    caption_owner: torch.Tensor  # (T,) the sample index of each caption
    labels: dict[str, torch.Tensor]  # key -> (N,)
    tasks: dict[str, ZeroShotTask]
    skipped: SkipCounter = field(default_factory=SkipCounter)
    present: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (N,) bool; absent key: all
    indices: torch.Tensor | None = None  # (N,) the source index of each row (skipped samples leave gaps)

    def __len__(self) -> int:
        for rows in (*self.embeddings.values(), *self.labels.values()):
            return len(rows)
        return 0

    def has(self, *modalities: str) -> torch.Tensor:
        """(N,) bool: the samples that have every one of `modalities`."""
        n = len(self)
        mask = torch.ones(n, dtype=torch.bool)
        for m in modalities:
            if m not in self.embeddings or len(self.embeddings[m]) != n:  # not embedded at all
                return torch.zeros(n, dtype=torch.bool)
            if m in self.present:
                mask &= self.present[m]
        return mask

    def labelled(self, modality: str, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, E) embeddings and (M,) labels of the samples that have `modality`."""
        rows = self.has(modality)
        return self.embeddings[modality][rows], self.labels[key][rows]


class EvalBatch(NamedTuple):
    values: dict[str, torch.Tensor]  # modality -> (b_m, ...) over the samples that have it
    present: dict[str, torch.Tensor]  # modality -> (b,) bool
    captions: list[list[str]]  # every caption of each sample
    labels: list[dict]  # the labels of each sample
    indices: list[int]  # the source index of each sample


def eval_batches(
    source: Source,
    transforms: dict[str, Transform],
    modalities: list[str],
    batch_size: int,
    max_samples: int | None,
    skipped: SkipCounter,
    need_captions: bool = True,
) -> Iterator[EvalBatch]:
    """The one walk over an evaluation source, shared by every evaluator that re-reads it (so their
    samples and captions line up). A sample may lack some of `modalities` (missing modalities are
    normal); one that has none of them, or no caption when captions are needed, or that fails to
    decode, is counted in `skipped` and left out."""
    rng = np.random.default_rng(0)
    n = len(source) if max_samples is None else min(len(source), max_samples)
    values: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    present: dict[str, list[bool]] = {m: [] for m in modalities}
    caps: list[list[str]] = []
    labels: list[dict] = []
    indices: list[int] = []

    def flush() -> EvalBatch:
        stacked = {m: torch.stack(v) for m, v in values.items() if v}
        masks = {m: torch.tensor(p, dtype=torch.bool) for m, p in present.items()}
        return EvalBatch(stacked, masks, caps, labels, indices)

    for index in range(n):
        try:
            raw = source[index]
            texts = captions(raw.get("text"))
            if need_captions and not texts:
                raise SampleError("empty_caption")
            sample = {m: transforms[m](raw[m], rng) for m in modalities if raw.get(m) is not None}
            if modalities and not sample:
                raise SampleError("no_modality", f"none of {', '.join(modalities)}")
        except SampleError as err:
            skipped[err.reason] += 1
            continue
        for m in modalities:
            present[m].append(m in sample)
            if m in sample:
                values[m].append(sample[m])
        caps.append(texts)
        labels.append(raw.get("label") or {})
        indices.append(index)
        if len(caps) == batch_size:
            yield flush()
            values, present = {m: [] for m in modalities}, {m: [] for m in modalities}
            caps, labels, indices = [], [], []
    if caps:
        yield flush()


@torch.no_grad()
def text_encoder(
    model: MultimodalModel, transform: Transform, runtime: Runtime, batch_size: int = 256
) -> Callable[[list[str]], torch.Tensor]:
    """A function list[str] -> (n, E) normalised text embeddings (on the CPU), encoded on `runtime`."""

    def encode(texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            ids = transform.encode(texts[i : i + batch_size]).to(runtime.device)
            with runtime.autocast():
                out.append(model.encode("text", ids).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, model.embed_dim)

    return encode


@torch.no_grad()
def embed_eval_set(
    name: str,
    model: MultimodalModel,
    transforms: dict[str, Transform],
    source: Source,
    runtime: Runtime,
    batch_size: int = 256,
    max_samples: int | None = None,
    progress: bool = False,
) -> EmbeddedSet:
    """Every sample's non-text embeddings and every caption's embedding, encoded on `runtime` (the
    embeddings come back on the CPU, in fp32)."""
    modalities = [m for m in model.modalities if m != "text" and m in transforms]
    encode_text = (
        text_encoder(model, transforms["text"], runtime, batch_size) if "text" in transforms else None
    )
    skipped = SkipCounter()
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    masks: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    kept_indices: list[int] = []
    texts: list[str] = []
    owner: list[int] = []
    labels: dict[str, list[int]] = {}
    kept = 0
    batches = eval_batches(
        source, transforms, modalities, batch_size, max_samples, skipped, encode_text is not None
    )
    for values, present, caps, labs, idx in tqdm(
        batches, desc=f"embed {name}", disable=not progress, leave=False
    ):
        for m in modalities:
            rows = torch.zeros(len(caps), model.embed_dim)  # zero rows where the sample lacks m
            if m in values:
                with runtime.autocast():
                    rows[present[m]] = model.encode(m, values[m].to(runtime.device)).float().cpu()
            chunks[m].append(rows)
            masks[m].append(present[m])
        kept_indices.extend(idx)
        for i, (c, lab) in enumerate(zip(caps, labs, strict=True)):
            texts.extend(c)
            owner.extend([kept + i] * len(c))
            for k, v in lab.items():
                labels.setdefault(k, []).append(int(v))
        kept += len(caps)
    embeddings = {m: torch.cat(c) if c else torch.zeros(0, model.embed_dim) for m, c in chunks.items()}
    captions = encode_text(texts) if encode_text is not None else torch.zeros(0, model.embed_dim)
    labels_t = {k: torch.tensor(v) for k, v in labels.items() if len(v) == kept}
    return EmbeddedSet(
        name,
        embeddings,
        captions,
        torch.tensor(owner, dtype=torch.long),
        labels_t,
        source.zero_shot_tasks(),
        skipped,
        {m: torch.cat(v) for m, v in masks.items() if v and not bool(torch.cat(v).all())},
        torch.tensor(kept_indices, dtype=torch.long),
    )


def labelled_features(
    eset: EmbeddedSet, train: EmbeddedSet
) -> Iterator[tuple[str, str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """(modality, label key, train_x, train_y, test_x, test_y, num_classes) for every non-text modality
    embedded in both splits and every label key both splits carry. The class count is the zero-shot
    task's when the dataset names one, else the largest label seen plus one."""
    keys = [k for k in eset.labels if k in train.labels]
    for modality in eset.embeddings:
        if modality == "text" or modality not in train.embeddings:
            continue
        # Only the samples that have the modality: absent rows are zeros, not features.
        test_rows, train_rows = eset.has(modality), train.has(modality)
        if not bool(test_rows.any()) or not bool(train_rows.any()):
            continue
        test_x, train_x = eset.embeddings[modality][test_rows], train.embeddings[modality][train_rows]
        for key in keys:
            test_y, train_y = eset.labels[key].long(), train.labels[key].long()
            for split, x, y in (("evaluation", test_rows, test_y), ("training", train_rows, train_y)):
                if len(x) != len(y):
                    raise ValueError(
                        f"dataset '{eset.name}' {split} split: {len(x)} '{modality}' rows "
                        f"but {len(y)} '{key}' labels"
                    )
            test_y, train_y = test_y[test_rows], train_y[train_rows]
            top = max(int(test_y.max()), int(train_y.max())) + 1
            if key in eset.tasks:
                num_classes = len(eset.tasks[key].classnames)
                if top > num_classes:
                    raise ValueError(
                        f"dataset '{eset.name}' label '{key}' reaches {top - 1}, but its task names only "
                        f"{num_classes} classes"
                    )
            else:
                num_classes = top
            yield modality, key, train_x, train_y, test_x, test_y, num_classes
