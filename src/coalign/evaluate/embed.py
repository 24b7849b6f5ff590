"""Embed an evaluation source once: every non-text modality per sample, every caption per sample."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from coalign.data.sources.base import SampleError, SkipCounter, Source, ZeroShotTask
from coalign.data.transforms.base import Transform
from coalign.models.model import MultimodalModel


@dataclass
class EmbeddedSet:
    name: str
    embeddings: dict[str, torch.Tensor]  # modality -> (N, E), normalised
    captions: torch.Tensor  # (T, E) every caption of every sample
    caption_owner: torch.Tensor  # (T,) the sample index of each caption
    labels: dict[str, torch.Tensor]  # key -> (N,)
    tasks: dict[str, ZeroShotTask]
    skipped: SkipCounter = field(default_factory=SkipCounter)


def _captions(value) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value or [])
    return [t for t in texts if isinstance(t, str) and t.strip()]


def eval_batches(
    source: Source,
    transforms: dict[str, Transform],
    modalities: list[str],
    batch_size: int,
    max_samples: int | None,
    skipped: SkipCounter,
    need_captions: bool = True,
) -> Iterator[tuple[dict[str, torch.Tensor], list[list[str]], list[dict]]]:
    """The one walk over an evaluation source, shared by every evaluator that re-reads it (so their
    samples and captions line up): batches of usable samples as ({modality: (b, ...)}, captions of
    each sample, labels of each sample). Unusable samples are counted in `skipped`."""
    rng = np.random.default_rng(0)
    n = len(source) if max_samples is None else min(len(source), max_samples)
    values: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    caps: list[list[str]] = []
    labels: list[dict] = []
    for index in range(n):
        try:
            raw = source[index]
            texts = _captions(raw.get("text"))
            if need_captions and not texts:
                raise SampleError("empty_caption")
            sample = {m: transforms[m](raw[m], rng) for m in modalities}
        except SampleError as err:
            skipped[err.reason] += 1
            continue
        for m in modalities:
            values[m].append(sample[m])
        caps.append(texts)
        labels.append(raw.get("label") or {})
        if len(caps) == batch_size:
            yield {m: torch.stack(v) for m, v in values.items()}, caps, labels
            values, caps, labels = {m: [] for m in modalities}, [], []
    if caps:
        yield {m: torch.stack(v) for m, v in values.items()}, caps, labels


@torch.no_grad()
def text_encoder(
    model: MultimodalModel, transform: Transform, device, batch_size: int = 256, autocast=None
) -> Callable:
    """A function list[str] -> (n, E) normalised text embeddings."""

    def encode(texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            ids = transform.encode(texts[i : i + batch_size]).to(device)
            with autocast() if autocast else torch.autocast(device.type, enabled=False):
                out.append(model.encode("text", ids).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, model.embed_dim)

    return encode


@torch.no_grad()
def embed_source(
    name: str,
    model: MultimodalModel,
    transforms: dict[str, Transform],
    source: Source,
    batch_size: int = 256,
    max_samples: int | None = None,
    device: torch.device | None = None,
    progress: bool = False,
    autocast=None,
) -> EmbeddedSet:
    device = device or torch.device("cpu")
    modalities = [m for m in model.modalities if m != "text" and m in transforms]
    encode_text = (
        text_encoder(model, transforms["text"], device, batch_size, autocast)
        if "text" in transforms
        else None
    )
    skipped = SkipCounter()
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    texts: list[str] = []
    owner: list[int] = []
    labels: dict[str, list[int]] = {}
    kept = 0
    batches = eval_batches(
        source, transforms, modalities, batch_size, max_samples, skipped, encode_text is not None
    )
    for values, caps, labs in tqdm(batches, desc=f"embed {name}", disable=not progress, leave=False):
        for m in modalities:
            with autocast() if autocast else torch.autocast(device.type, enabled=False):
                chunks[m].append(model.encode(m, values[m].to(device)).float().cpu())
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
    )
