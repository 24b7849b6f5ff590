"""The one encoder contract.

    tokens = encoder(x)            # Tokens(tokens (B, N, D), mask (B, N) bool or None)
    pooled = encoder.pool(tokens)  # (B, D)

`x` is what the modality's transform and collate produce (images: (B, 3, H, W); text: (B, L) ids).
`mask` marks real tokens (False = padding); objectives that work on tokens (FILIP, ITM, MLM,
captioning) use it, the rest use the pooled vector through a projection head.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, NamedTuple

import pydantic
import torch
from torch import nn

from coalign.registry import StrictModel

Positive = Annotated[int, pydantic.Field(ge=1)]  # a size or count of at least one
Dropout = Annotated[float, pydantic.Field(ge=0.0, lt=1.0)]
MlpRatio = Annotated[float, pydantic.Field(gt=0.0)]


class EncoderConfig(StrictModel):
    """Base of every encoder's Config.

    Options a transform describes (image_size, vocab_size, ...) are filled in from its `describe()`
    when the recipe leaves them unset (`fill_inputs`). A recipe that does set one must agree with the
    transform: equal, or at least as large for the names in `inputs_at_least` (a text tower may hold
    more positions than the tokenizer fills). The recipe loader checks both at load.
    """

    inputs_at_least: ClassVar[tuple[str, ...]] = ()
    # Recompute each block's activations in the backward instead of storing them: less memory for a
    # big tower, about a third more compute. Training only; evaluation never stores activations.
    grad_checkpointing: bool = False

    @pydantic.field_validator("heads", check_fields=False)
    @classmethod
    def _heads_divide_width(cls, heads: int, info: pydantic.ValidationInfo) -> int:
        width = info.data.get("width")
        if width is not None and width % heads:
            raise ValueError(f"{heads} heads do not divide width {width}; each head gets width / heads")
        return heads


def fill_inputs(config_cls: type | None, options: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """`options` with the Config fields that are unset taken from a transform's `describe()`."""
    fields = config_cls.model_fields if config_cls is not None else {}
    out = dict(options)
    for key, value in inputs.items():
        if key in fields and out.get(key) is None:
            out[key] = value
    return out


def input_mismatches(config_cls: type | None, options: dict[str, Any], inputs: dict[str, Any]) -> list[str]:
    """The options a recipe sets explicitly that disagree with what the transform feeds the encoder."""
    fields = config_cls.model_fields if config_cls is not None else {}
    at_least = getattr(config_cls, "inputs_at_least", ())
    bad = []
    for key, fed in inputs.items():
        mine = options.get(key)
        if key not in fields or mine is None or mine == fed:
            continue
        if key in at_least:
            if isinstance(mine, int | float) and mine < fed:
                bad.append(f"{key}: {mine} is less than the {fed} the transform produces")
        else:
            bad.append(f"{key}: {mine!r} differs from the {fed!r} the transform produces")
    return bad


class Tokens(NamedTuple):
    tokens: torch.Tensor  # (B, N, D)
    mask: torch.Tensor | None  # (B, N) bool, True = real token


class Encoder(nn.Module):
    # The kind of raw value its input is made from (a world modality: image, text, audio, points,
    # tabular); the registry tests feed it what that modality's transforms produce.
    modality: str = ""
    width: int  # D, the token width
    input_ndim: int  # dimensions of one batch of inputs: 4 for (B, 3, H, W) images, 2 for (B, L) ids
    num_prefix_tokens: int = 0  # leading tokens that are not content (a ViT's CLS), timm's name

    def valid_items(self, x: Any) -> torch.Tensor:
        """(n,) bool: which inputs are real. Groups of items (several captions per sample) pad with
        empty items; an encoder whose inputs can be empty says which are (text: all-padding rows)."""
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)

    def forward(self, x: Any) -> Tokens:
        raise NotImplementedError

    def trimmed_length(self, x: Any) -> int | None:
        """How many leading positions of the last axis of x (a batch, or groups of items) some item
        uses, when cutting x to them changes neither the kept tokens nor the pooled vectors; None when
        it cannot be cut. Text pads every caption to the context length, so a batch of short captions
        is mostly padding that attends to nothing (`MultimodalModel.trim_lengths`)."""
        return None

    def pool(self, out: Tokens) -> torch.Tensor:
        raise NotImplementedError

    def lock_blocks(self) -> list[nn.Module]:
        """The tower's blocks, input to output, for `unlock_last: N` (models/lock.py): by default the
        blocks of each transformer stack it holds. A tower built otherwise says what its blocks are."""
        from coalign.models.layers import Transformer

        return [b for m in self.modules() if isinstance(m, Transformer) for b in m.blocks]

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        for m in self.modules():
            if hasattr(m, "grad_checkpointing"):
                m.grad_checkpointing = enabled

    @classmethod
    def example_input(cls, cfg: Any, batch: int = 2) -> Any:
        """A valid input batch, so tests can run every registered encoder generically."""
        raise NotImplementedError


def used_positions(real: torch.Tensor) -> int:
    """(N, L) bool real tokens -> the positions up to the last real one in any row (at least 1):
    what `Encoder.trimmed_length` keeps of padded token ids."""
    used = real.any(0)  # (L,)
    return int(used.nonzero().max()) + 1 if bool(used.any()) else 1


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, N, D), (B, N) -> (B, D) mean over real tokens."""
    if mask is None:
        return tokens.mean(1)
    w = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)
