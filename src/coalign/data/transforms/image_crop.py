"""`image_crop`: CLIP's evaluation preprocessing (OpenAI's and OpenCLIP's): the shorter side resized
to `size` (bicubic by default), the centre `size` x `size` cropped, then mean/std normalised. Images
keep their aspect ratio, where `image` squashes them to a square. Converted OpenCLIP and Hugging Face
CLIP runs use it, so they see their inputs as they were trained to. It goes through torchvision's own
transforms (what open_clip uses), so the pixels are the same.

`resize: squash` resizes straight to the square (open_clip's `resize_mode: squash`, and what
Hugging Face's SigLIP processor does). Training adds `image`'s random-resized crop when `crop_scale`
is set.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torchvision.transforms import CenterCrop, InterpolationMode, Normalize, Resize
from torchvision.transforms.functional import to_tensor

from coalign.data.transforms.image import ImageConfig, ImageTransform
from coalign.registry import TRANSFORMS


class ImageCropConfig(ImageConfig):
    size: int = 224
    resize: Literal["shortest", "squash"] = "shortest"
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"


@TRANSFORMS.register("image_crop")
class ImageCropTransform(ImageTransform):
    Config = ImageCropConfig
    modality = "image"
    shared_with_views = ("size", "mean", "std", "resize", "interpolation")

    def __init__(self, cfg: ImageCropConfig | None = None, **kwargs):
        super().__init__(cfg or ImageCropConfig(**kwargs))
        mode = (
            InterpolationMode.BICUBIC if self.cfg.interpolation == "bicubic" else InterpolationMode.BILINEAR
        )
        size = self.cfg.size
        self._resize = Resize(size if self.cfg.resize == "shortest" else (size, size), interpolation=mode)
        self._crop = CenterCrop(size)
        self._normalize = Normalize(self.cfg.mean, self.cfg.std)

    def __call__(self, value: Any, rng: np.random.Generator) -> torch.Tensor:
        img = self.decode(value)
        if self.train and self.cfg.crop_scale is not None:
            img = self._random_resized_crop(img, rng).resize((self.cfg.size,) * 2, self._pil_mode())
        else:
            img = self._crop(self._resize(img))
        return self._normalize(to_tensor(img))  # (3, size, size)

    def _pil_mode(self) -> int:
        from PIL import Image

        return Image.BICUBIC if self.cfg.interpolation == "bicubic" else Image.BILINEAR
