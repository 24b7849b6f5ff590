"""Image transform: decode (array, path or bytes), resize, optional random-resized-crop, normalise.

Decoding is bounded: `max_pixels` (default 25 Mpx, the server's limit too) is checked against the
size in the file's header, before any pixel is decoded, so a small file that claims a huge image
(a decompression bomb) costs nothing; it is skipped and counted as `image_too_large`. PIL's own
`Image.MAX_IMAGE_PIXELS` guard (about 89 Mpx) still applies above it.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import torch
from PIL import Image, UnidentifiedImageError

from coalign.data.sources.base import SampleError
from coalign.data.transforms.base import Transform
from coalign.registry import TRANSFORMS, StrictModel

# OpenAI CLIP's normalisation, so that converted checkpoints see the inputs they were trained on.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# 25 Mpx (e.g. 5000 x 5000) is about 75 MB once decoded to RGB; beyond it a sample costs more memory
# than a whole batch of the images models are trained on, and is far more likely a bomb than a photo.
MAX_PIXELS = 25_000_000


class ImageConfig(StrictModel):
    size: int = pydantic.Field(64, ge=1)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    crop_scale: tuple[float, float] | None = None  # random-resized-crop area range when training
    # larger images (width x height, read from the header before decoding) are skipped: image_too_large
    max_pixels: int = pydantic.Field(MAX_PIXELS, gt=0)
    # Images read from files are kept decoded in memory (per process, keyed by path) up to this many
    # megabytes, so later epochs skip reading and decoding them: resized to `size` (12 KB at 64 px)
    # unless `crop_scale` crops them, then as decoded. 0 (the default): decode every time; at 64 px
    # PNGs the cache gained nothing measurable (the files sit in the page cache; see the README).
    cache_mb: float = pydantic.Field(0.0, ge=0.0)

    @classmethod
    def tiny(cls) -> dict:
        return {"size": 32, "crop_scale": (0.5, 1.0)}  # training augments, as real recipes do

    @pydantic.field_validator("std")
    @classmethod
    def _divides(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(s > 0 for s in v):
            raise ValueError(f"every channel's std must be > 0 (pixels are divided by it), got {list(v)}")
        return v

    @pydantic.field_validator("crop_scale")
    @classmethod
    def _area_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"need 0 < low <= high <= 1 (fractions of the image's area), got {list(v)}")
        return v


def too_large(width: int, height: int, max_pixels: int) -> SampleError | None:
    if width * height <= max_pixels:
        return None
    return SampleError("image_too_large", f"{width} x {height} is over the limit of {max_pixels} pixels")


def _open(fp: Any, max_pixels: int) -> Image.Image:
    """Open (lazily: only the header is read), check the size, then decode."""
    with warnings.catch_warnings():
        # PIL warns above MAX_IMAGE_PIXELS and raises above twice that: both mean too large here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(fp) as im:
                err = too_large(*im.size, max_pixels)
                if err is not None:
                    raise err
                im.load()
                return im.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as bomb:
            raise SampleError("image_too_large", str(bomb)) from None


def decode_image(value: Any, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An RGB PIL image from an array, a PIL image, a path or encoded bytes; SampleError otherwise
    (`image_too_large` when it has more than `max_pixels`, decided before decoding)."""
    if isinstance(value, Image.Image):
        if (err := too_large(*value.size, max_pixels)) is not None:
            raise err
        return value.convert("RGB")
    if isinstance(value, np.ndarray):
        if value.ndim == 2:
            value = np.stack([value] * 3, axis=-1)
        if value.ndim != 3 or value.shape[-1] not in (1, 3, 4):
            raise SampleError("corrupt_image", f"array of shape {value.shape} is not an image")
        if (err := too_large(value.shape[1], value.shape[0], max_pixels)) is not None:
            raise err
        return Image.fromarray(np.ascontiguousarray(value).astype(np.uint8)).convert("RGB")
    try:
        if isinstance(value, str | Path):
            if not Path(value).is_file():
                what = "a folder, not a file" if Path(value).is_dir() else "no such file"
                raise SampleError("missing_image", f"{value}: {what}")
            return _open(value, max_pixels)
        if isinstance(value, bytes | bytearray):
            return _open(io.BytesIO(value), max_pixels)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise SampleError("corrupt_image", f"{str(value)[:200]}: {err}") from None
    raise SampleError("corrupt_image", f"cannot read an image from {type(value).__name__}")


@TRANSFORMS.register("image")
class ImageTransform(Transform):
    Config = ImageConfig
    modality = "image"
    shared_with_views = ("size", "mean", "std")

    def __init__(self, cfg: ImageConfig | None = None, **kwargs):
        self.cfg = cfg or ImageConfig(**kwargs)
        self.mean = torch.tensor(self.cfg.mean).view(3, 1, 1)
        self.std = torch.tensor(self.cfg.std).view(3, 1, 1)
        self._decoded: dict[str, np.ndarray] = {}  # path -> (H, W, 3) uint8 (see `cache_mb`)
        self._decoded_bytes = 0

    def decode(self, value: Any) -> Image.Image:
        """The raw value as an RGB image, under this transform's pixel limit."""
        return decode_image(value, self.cfg.max_pixels)

    def __call__(self, value: Any, rng: np.random.Generator) -> torch.Tensor:
        size = self.cfg.size
        pixels = self._cached(value) if isinstance(value, str | Path) and self.cfg.cache_mb else None
        if pixels is not None and pixels.shape[:2] == (size, size) and not self._crops:  # as cached
            x = torch.from_numpy(pixels.copy())
        else:
            img = self.decode(value) if pixels is None else Image.fromarray(pixels)
            if self._crops:
                img = self._random_resized_crop(img, rng)
            if img.size != (size, size):
                img = img.resize((size, size), Image.BICUBIC)
            x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
        x = x.permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std  # (3, H, W)

    @property
    def _crops(self) -> bool:
        return self.train and self.cfg.crop_scale is not None

    def _cached(self, path: str | Path) -> np.ndarray:
        """The file's pixels, decoded once while they fit in `cache_mb`: at the output size, or as
        decoded when `crop_scale` is set (every mode then starts from the full image, as it does when
        decoding). A file that fails to decode raises, and is not kept."""
        key = str(path)
        if key in self._decoded:
            return self._decoded[key]
        img = self.decode(path)
        size = self.cfg.size
        if self.cfg.crop_scale is None and img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        pixels = np.asarray(img, dtype=np.uint8)
        if self._decoded_bytes + pixels.nbytes <= self.cfg.cache_mb * 2**20:
            self._decoded[key] = pixels
            self._decoded_bytes += pixels.nbytes
        return pixels

    def _random_resized_crop(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        w, h = img.size
        lo, hi = self.cfg.crop_scale
        area = w * h * rng.uniform(lo, hi)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw = int(round(min(w, np.sqrt(area * aspect))))
        ch = int(round(min(h, np.sqrt(area / aspect))))
        x0 = int(rng.integers(0, w - cw + 1))
        y0 = int(rng.integers(0, h - ch + 1))
        return img.crop((x0, y0, x0 + cw, y0 + ch))

    def describe(self) -> dict[str, Any]:
        return {"image_size": self.cfg.size, "channels": 3}
