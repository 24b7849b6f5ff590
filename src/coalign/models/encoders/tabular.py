"""Tabular encoders: FT-Transformer (Gorishniy et al. 2021) and a plain MLP baseline.

Input: (B, F) float32, the first `numeric` columns numeric values (NaN = missing), the remaining
columns categorical indices stored as floats (NaN = missing), one per field of `categories`
(their cardinalities). Numeric values are expected standardised by the transform.

Both encoders share one feature tokenizer: numeric feature i becomes x_i * W_i + b_i, categorical
field j becomes its own embedding row + b_j. A missing value becomes a learned per-feature "missing"
vector instead: missingness is often informative, and imputing a mean would hide it.
"""

from __future__ import annotations

import math
from typing import Literal

import pydantic
import torch
from torch import nn

from coalign.models.encoders.base import Dropout, Encoder, EncoderConfig, MlpRatio, Positive, Tokens
from coalign.models.layers import Transformer, init_weights
from coalign.registry import ENCODERS


class TabularFields(EncoderConfig):
    numeric: int | None = None  # taken from the tabular transform when unset
    categories: list[int] | None = None  # cardinality of each categorical field; likewise


class FTTransformerConfig(TabularFields):
    width: Positive = 192
    depth: Positive = 3
    heads: Positive = 8
    mlp_ratio: MlpRatio = 4 / 3  # FT-Transformer's feed-forward factor
    dropout: Dropout = 0.0
    pool: Literal["cls", "mean"] = "cls"  # cls adds a CLS token; mean averages the feature tokens

    @classmethod
    def tiny(cls) -> dict:
        return {"width": 32, "depth": 1, "heads": 2}


class TabularMLPConfig(TabularFields):
    feature_dim: Positive = 16  # per-feature embedding width before concatenation
    width: Positive = 256
    depth: int = pydantic.Field(2, ge=0)  # hidden layers; 0: one linear layer
    dropout: Dropout = 0.0

    @classmethod
    def tiny(cls) -> dict:
        return {"width": 32, "depth": 1, "feature_dim": 4}


def _check_fields(name: str, cfg: TabularFields) -> tuple[int, list[int]]:
    if cfg.numeric is None or cfg.categories is None:
        raise ValueError(f"{name} needs numeric and categories (normally from the tabular transform)")
    if cfg.numeric < 0 or any(c < 1 for c in cfg.categories) or cfg.numeric + len(cfg.categories) == 0:
        raise ValueError(
            f"{name}: need numeric >= 0, every cardinality >= 1 and at least one feature; "
            f"got numeric={cfg.numeric}, categories={cfg.categories}"
        )
    return cfg.numeric, list(cfg.categories)


class FeatureTokenizer(nn.Module):
    """(B, F) -> (B, F, dim): one vector per feature (numeric first, then categorical)."""

    def __init__(self, numeric: int, categories: list[int], dim: int):
        super().__init__()
        self.numeric, self.categories = numeric, categories
        bound = 1 / math.sqrt(dim)  # FT-Transformer's uniform init

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))

        if numeric:
            self.weight, self.bias = param(numeric, dim), param(numeric, dim)
            self.missing = param(numeric, dim)
        if categories:
            # One table for all fields (row offsets per field), each field with an extra last row
            # for "missing": a single gather instead of a loop over fields.
            sizes = torch.tensor([c + 1 for c in categories])
            self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes, persistent=False)
            self.register_buffer("cards", torch.tensor(categories, dtype=torch.float32), persistent=False)
            self.embed = nn.Embedding(int(sizes.sum()), dim)
            nn.init.uniform_(self.embed.weight, -bound, bound)
            self.cat_bias = param(len(categories), dim)

    @property
    def num_features(self) -> int:
        return self.numeric + len(self.categories)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"tabular input must be (B, {self.num_features}) ({self.numeric} numeric + "
                f"{len(self.categories)} categorical columns), got {tuple(x.shape)}"
            )
        out = []
        if self.numeric:
            num = x[:, : self.numeric]  # (B, Fn)
            nan = num.isnan()[..., None]
            # NaN is zeroed before the product: NaN * W would poison W's gradient even where masked out.
            num = num.nan_to_num(0.0).to(self.weight.dtype)
            tok = num[..., None] * self.weight + self.bias  # (B, Fn, dim)
            out.append(torch.where(nan, self.missing, tok))
        if self.categories:
            out.append(self.embed(self.category_rows(x[:, self.numeric :])) + self.cat_bias)  # (B, Fc, dim)
        return torch.cat(out, dim=1)

    def category_rows(self, cat: torch.Tensor) -> torch.Tensor:
        """(B, Fc) float category indices -> (B, Fc) table rows; NaN -> the field's missing row."""
        nan = cat.isnan()
        v = cat.nan_to_num(0.0)
        bad = ~nan & ((v < 0) | (v >= self.cards) | (v != v.round()))
        if bad.any():  # one host sync per batch; a wrong index must not silently read a neighbour's row
            row, j = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"tabular column {self.numeric + j} (categorical field {j}) holds {cat[row, j].item()!r} "
                f"in row {row}; valid: integers 0..{self.categories[j] - 1}, or NaN for missing"
            )
        idx = torch.where(nan, self.cards, v).long()  # the missing row is the field's last
        return idx + self.offsets


def example_table(numeric: int, categories: list[int], batch: int) -> torch.Tensor:
    """(B, F) numeric N(0, 1) values and valid category indices, with some NaNs in every column."""
    num = torch.randn(batch, numeric)
    cat = torch.stack([torch.randint(0, c, (batch,)).float() for c in categories], 1) if categories else None
    x = torch.cat([num, cat], dim=1) if cat is not None else num
    cols = torch.arange(x.shape[1])
    x[cols % batch, cols] = float("nan")  # one missing value per column, spread over the rows
    return x


@ENCODERS.register("tabular_transformer")
class TabularTransformer(Encoder):
    Config = FTTransformerConfig
    modality = "tabular"
    input_ndim = 2

    def __init__(self, cfg: FTTransformerConfig):
        super().__init__()
        numeric, categories = _check_fields("tabular_transformer", cfg)
        self.cfg, self.width = cfg, cfg.width
        self.num_prefix_tokens = 1 if cfg.pool == "cls" else 0
        self.tokenizer = FeatureTokenizer(numeric, categories, cfg.width)
        if cfg.pool == "cls":
            self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.width).uniform_(-1, 1) / math.sqrt(cfg.width))
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.dropout)
        init_weights(self.transformer)

    def forward(self, x: torch.Tensor) -> Tokens:
        """x: (B, numeric + len(categories)) floats, NaN = missing."""
        tokens = self.tokenizer(x)  # (B, F, D)
        if self.cfg.pool == "cls":
            tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        return Tokens(self.transformer(tokens), None)  # (B, [1 +] F, D)

    def pool(self, out: Tokens) -> torch.Tensor:
        return out.tokens[:, 0] if self.cfg.pool == "cls" else out.tokens.mean(1)

    @classmethod
    def example_input(cls, cfg: FTTransformerConfig, batch: int = 2) -> torch.Tensor:
        return example_table(cfg.numeric, cfg.categories, batch)


@ENCODERS.register("tabular_mlp")
class TabularMLP(Encoder):
    """Feature vectors concatenated -> MLP -> one token: the baseline a transformer must beat."""

    Config = TabularMLPConfig
    modality = "tabular"
    input_ndim = 2

    def __init__(self, cfg: TabularMLPConfig):
        super().__init__()
        numeric, categories = _check_fields("tabular_mlp", cfg)
        self.cfg, self.width = cfg, cfg.width
        self.tokenizer = FeatureTokenizer(numeric, categories, cfg.feature_dim)
        layers: list[nn.Module] = []
        dim = self.tokenizer.num_features * cfg.feature_dim
        for _ in range(cfg.depth):
            layers += [nn.Linear(dim, cfg.width), nn.GELU(), nn.Dropout(cfg.dropout)]
            dim = cfg.width
        layers += [nn.Linear(dim, cfg.width), nn.LayerNorm(cfg.width)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> Tokens:
        """x: (B, numeric + len(categories)) floats, NaN = missing."""
        h = self.tokenizer(x).flatten(1)  # (B, F * feature_dim)
        return Tokens(self.mlp(h).unsqueeze(1), None)  # (B, 1, D)

    def pool(self, out: Tokens) -> torch.Tensor:
        return out.tokens[:, 0]

    @classmethod
    def example_input(cls, cfg: TabularMLPConfig, batch: int = 2) -> torch.Tensor:
        return example_table(cfg.numeric, cfg.categories, batch)
