"""What `coalign embed` makes of one source sample: the transformed inputs of each embedded modality,
its metadata row and its thumbnail, or the reason it is skipped. A torch Dataset, so DataLoader workers
share the decoding (the slow part for file sources); coalign.search.embed batches, embeds and writes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from coalign.data.sample import first_caption
from coalign.data.sources.base import SampleError, Source
from coalign.data.transforms.base import Transform
from coalign.data.transforms.image import decode_image

# A missing value is counted under the reason its transform would give (the sources use the same keys).
MISSING_REASON = {"text": "empty_caption", "image": "missing_image"}


class Skip(NamedTuple):
    """What `Prepared` gives for a sample it cannot use."""

    reason: str
    index: int


class Prepared(torch.utils.data.Dataset):
    """Source index -> transformed inputs, metadata and thumbnail bytes; or the SampleError's reason.

    Decoding (the slow part for file sources) happens here, so DataLoader workers can share it."""

    def __init__(self, source: Source, transforms: dict[str, Transform], modalities: list[str], thumb: int):
        self.source, self.transforms, self.modalities, self.thumb = source, transforms, modalities, thumb

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any] | Skip:
        try:
            raw = self.source[index]
            inputs, png = {}, None
            for m in self.modalities:
                value = raw.get(m)
                if value is None:
                    raise SampleError(MISSING_REASON.get(m, f"missing_{m}"))
                transform = self.transforms[m]
                if (
                    m == "image"
                ):  # decode once (under the transform's pixel limit): for the model and the thumbnail
                    value = transform.decode(value) if hasattr(transform, "decode") else decode_image(value)
                    png = thumbnail_png(value, self.thumb) if self.thumb else None
                inputs[m] = transform(value, np.random.default_rng(index))
        except SampleError as err:
            return Skip(err.reason, index)
        image = raw.get("image")
        return {
            "inputs": inputs,
            "png": png,
            "meta": {
                "id": str(raw.get("id", index)),
                "path": str(image) if isinstance(image, str | Path) else None,
                "caption": first_caption(raw.get("text")),
                "labels": json.dumps({k: int(v) for k, v in (raw.get("label") or {}).items()}),
                "source_index": index,
            },
        }


def thumbnail_png(image: Image.Image, size: int) -> bytes:
    if max(image.size) > size:
        image = image.copy()
        image.thumbnail((size, size), Image.BICUBIC)  # keeps the aspect ratio
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
