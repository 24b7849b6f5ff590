"""Embed an evaluation source once: every non-text modality per sample, every caption per sample."""

from __future__ import annotations

from collections.abc import Callable
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
    rng = np.random.default_rng(0)
    pending: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    texts: list[str] = []
    owner: list[int] = []
    labels: dict[str, list[int]] = {}

    def flush() -> None:
        for m in modalities:
            if pending[m]:
                x = torch.stack(pending[m]).to(device)
                with autocast() if autocast else torch.autocast(device.type, enabled=False):
                    chunks[m].append(model.encode(m, x).float().cpu())
                pending[m] = []

    n = len(source) if max_samples is None else min(len(source), max_samples)
    kept = 0
    for index in tqdm(range(n), desc=f"embed {name}", disable=not progress, leave=False):
        try:
            raw = source[index]
            caps = _captions(raw.get("text"))
            if encode_text is not None and not caps:
                raise SampleError("empty_caption")
            values = {m: transforms[m](raw[m], rng) for m in modalities}
        except SampleError as err:
            skipped[err.reason] += 1
            continue
        for m in modalities:
            pending[m].append(values[m])
        texts.extend(caps)
        owner.extend([kept] * len(caps))
        for k, v in (raw.get("label") or {}).items():
            labels.setdefault(k, []).append(int(v))
        kept += 1
        if len(next(iter(pending.values()), [])) >= batch_size:
            flush()
    flush()
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
