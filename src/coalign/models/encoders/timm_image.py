"""An image tower from `timm`: any architecture by name, weights from a local file.

    towers:
      image: {encoder: timm, model: vit_small_patch16_224, weights: /models/vit_s16.safetensors}

The model is built with `timm.create_model(model, num_classes=0, **options)` (no classifier: the
projection head maps its features into the shared space), and `weights` (a `.safetensors`, `.pth`
or `.bin` state dict) is loaded through timm's own pretrained path
(`pretrained_cfg_overlay={"file": weights}`), so a classifier in the file is dropped and a ViT's
position embeddings are resampled to `image_size` as timm does. Nothing is downloaded: without
`weights` the model is randomly initialised.

Tokens: a transformer's `forward_features` (B, N, D) with its prefix tokens first (the class token);
a convolutional network's feature map (B, C, H, W) as H*W tokens of width C. Pooling: `cls` (the
first prefix token), `mean` (over content tokens), or `auto` (cls when the model pools by its class
token, as timm's ViTs do by default, else mean).
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic
import torch
from torch import nn

from coalign.io import local_path
from coalign.models.encoders.base import Encoder, EncoderConfig, Positive, Tokens
from coalign.registry import ENCODERS


class TimmConfig(EncoderConfig):
    model: str = "vit_tiny_patch16_224"  # a timm architecture name (`timm.list_models()`)
    weights: str | None = None  # a local state dict; None: random initialisation
    image_size: Positive | None = None  # taken from the image transform when unset
    depth: Positive | None = None  # blocks, for architectures that take it (ViT, DeiT, ...)
    options: dict[str, Any] = {}  # more keyword arguments of timm.create_model (drop_path_rate, ...)
    pool: Literal["auto", "cls", "mean"] = "auto"

    # No `tiny()`: --smoke keeps the architecture and weights the recipe names (a smaller one would not
    # load them), and the default architecture is small already.

    @pydantic.field_validator("weights")
    @classmethod
    def _a_file(cls, v: str | None) -> str | None:
        if v is not None and not local_path(v).is_file():
            raise ValueError(f"weights file '{v}' not found (a local .safetensors, .pth or .bin state dict)")
        return v

    @pydantic.field_validator("model")
    @classmethod
    def _known(cls, v: str) -> str:
        import timm

        if not timm.is_model(v):
            close = timm.list_models(f"*{v.split('_')[0]}*")[:8]
            raise ValueError(
                f"timm has no architecture '{v}'" + (f"; similar: {', '.join(close)}" if close else "")
            )
        return v


@ENCODERS.register("timm")
class TimmImage(Encoder):
    Config = TimmConfig
    modality = "image"
    input_ndim = 4

    def __init__(self, cfg: TimmConfig):
        super().__init__()
        import timm  # imported only when such a tower is built

        self.cfg = cfg
        kwargs: dict[str, Any] = {"num_classes": 0, **cfg.options}
        if cfg.depth is not None:
            kwargs["depth"] = cfg.depth
        if cfg.weights is not None:
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(local_path(cfg.weights))})
        try:  # transformers take their input size; convolutional networks take any
            self.model = timm.create_model(cfg.model, img_size=cfg.image_size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
            self.model = timm.create_model(cfg.model, **kwargs)
        self.width = int(self.model.num_features)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        pool = cfg.pool
        if pool == "auto":
            pool = (
                "cls"
                if self.num_prefix_tokens and getattr(self.model, "global_pool", "") == "token"
                else "mean"
            )
        if pool == "cls" and not self.num_prefix_tokens:
            raise ValueError(f"pool 'cls': timm model '{cfg.model}' has no class token; use pool: mean")
        self.pooling = pool

    def lock_blocks(self) -> list[nn.Module]:
        """The modules of timm's feature stages (a ViT's blocks, a ResNet's stem and layers)."""
        return [self.model.get_submodule(f["module"]) for f in self.model.feature_info]

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.model.set_grad_checkpointing(enabled)

    def forward(self, x: torch.Tensor) -> Tokens:
        features = self.model.forward_features(x)
        if features.ndim == 4:  # a feature map (B, C, H, W) -> (B, H*W, C)
            features = features.flatten(2).transpose(1, 2)
        return Tokens(features, None)

    def pool(self, out: Tokens) -> torch.Tensor:
        if self.pooling == "cls":
            return out.tokens[:, 0]
        return out.tokens[:, self.num_prefix_tokens :].mean(1)

    @classmethod
    def example_input(cls, cfg: TimmConfig, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, 3, cfg.image_size or 224, cfg.image_size or 224)
