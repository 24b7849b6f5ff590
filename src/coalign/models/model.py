"""MultimodalModel: one encoder tower and one projection head per modality."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coalign.config import ModelConfig, TowerSpec
from coalign.data.sample import base_modality
from coalign.models.decoder import Decoder
from coalign.models.encoders.base import Encoder, Tokens, fill_inputs, input_mismatches
from coalign.models.fusion import Fusion
from coalign.models.lock import FeatureCache, apply_lock, frozen_modules
from coalign.registry import DECODERS, ENCODERS, FUSION, HEADS, ConfigError


@dataclass
class Features:
    """What the model computes for one modality of a batch.

    For a group input (k items per sample, e.g. (B, k, L) captions) `embedding` is (B, k, E) with
    zeros where `group_mask` (B, k) is False, and tokens / pooled cover only the real items, flattened.
    """

    tokens: Tokens  # (B, N, D) and padding mask
    pooled: torch.Tensor  # (B, D)
    embedding: torch.Tensor  # (B, E), L2-normalised; (B, k, E) for groups
    group_mask: torch.Tensor | None = None  # (B, k) for groups

    def differentiable(self) -> list[torch.Tensor]:
        """The tensors a loss can send a gradient into: tokens, pooled, embedding."""
        return [self.tokens.tokens, self.pooled, self.embedding]

    def as_leaves(self) -> Features:
        """The same values, detached, as leaves that collect the loss's gradient (GradCache)."""
        tokens, pooled, embedding = (t.detach().requires_grad_() for t in self.differentiable())
        return Features(Tokens(tokens, self.tokens.mask), pooled, embedding, self.group_mask)

    @staticmethod
    def cat(parts: list[Features]) -> Features:
        """Micro-batches' features, concatenated row-wise in order (as one batch would have them)."""

        def cat(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if ts[0] is None else torch.cat(ts)  # type: ignore[arg-type]

        return Features(
            Tokens(cat([p.tokens.tokens for p in parts]), cat([p.tokens.mask for p in parts])),
            cat([p.pooled for p in parts]),
            cat([p.embedding for p in parts]),
            cat([p.group_mask for p in parts]),
        )

    def without_rows(self) -> Features:
        """The same fields cut to zero rows, still on the graph of what computed them (a `StandIn`'s)."""
        return Features(
            Tokens(self.tokens.tokens[:0], None if self.tokens.mask is None else self.tokens.mask[:0]),
            self.pooled[:0],
            self.embedding[:0],
            None if self.group_mask is None else self.group_mask[:0],
        )


@dataclass(frozen=True)
class StandIn:
    """In a batch, in place of a key it has no rows of: one real row (1, ...) of that key from
    elsewhere. `MultimodalModel.forward` runs the key's tower on it and keeps none of its rows, so the
    key's features have zero rows and send exactly zero gradient into the tower. Why: under FSDP
    (`train/fsdp.py`) every rank must run every sharded tower in every step, because the tower's
    forward all-gathers its weights and its backward reduce-scatters their gradients with the other
    ranks; a rank that skipped it would leave them waiting (or, with gloo, meet their all-gather with
    its next collective). A real row (rather than zeros or an empty batch: the point and audio
    encoders cannot take zero rows) keeps every encoder's activations finite, so zero times them
    stays exactly zero."""

    row: torch.Tensor  # (1, ...)


class MultimodalModel(nn.Module):
    def __init__(
        self,
        towers: dict[str, Encoder],
        heads: dict[str, nn.Module],
        embed_dim: int,
        fusion: Fusion | None = None,
        decoder: Decoder | None = None,
    ):
        super().__init__()
        self.towers = nn.ModuleDict(towers)
        self.heads = nn.ModuleDict(heads)
        self.embed_dim = embed_dim
        # A submodule, so checkpoints and the optimizer hold it; absent (no state-dict keys) without one.
        self.fusion = fusion
        self.decoder = decoder  # a caption decoder (models/decoder.py), likewise absent without one
        # Each tower's lock options (models/lock.py), read again by every `train()` so locked towers and
        # frozen norms stay in eval mode, and the feature caches of locked towers: plain attributes,
        # not submodules (no state-dict keys).
        self.locks: dict[str, TowerSpec] = {}
        self.caches: dict[str, FeatureCache] = {}

    @classmethod
    def from_config(cls, cfg: ModelConfig, inputs: dict[str, dict[str, Any]]) -> MultimodalModel:
        """Build from a recipe's model section; `inputs[modality]` (from the transforms' `describe()`)
        fills encoder options the recipe leaves unset, such as image_size or vocab_size."""
        towers, heads = {}, {}
        for modality, spec in cfg.towers.items():
            config_cls = ENCODERS.config_class(spec.encoder)
            options = fill_inputs(config_cls, spec.options(), inputs.get(modality, {}))
            towers[modality] = ENCODERS.create(spec.encoder, where=f"model.towers.{modality}", **options)
            tower_cfg = getattr(towers[modality], "cfg", None)
            towers[modality].set_grad_checkpointing(bool(getattr(tower_cfg, "grad_checkpointing", False)))
            heads[modality] = HEADS.get(cfg.head)(towers[modality].width, cfg.embed_dim)
            apply_lock(towers[modality], spec, f"model.towers.{modality}")
        fusion = None
        if cfg.fusion is not None:
            parsed = FUSION.validate(cfg.fusion.fusion, cfg.fusion.options(), "model.fusion")
            widths = {m: t.width for m, t in towers.items()}
            fusion = FUSION.get(cfg.fusion.fusion)(parsed, widths)
        decoder = None
        if cfg.decoder is not None:
            # the vocabulary (and any other option the text transform describes) from the text tower's inputs
            config_cls = DECODERS.config_class(cfg.decoder.decoder)
            text = cfg.decoder.options().get("text", config_cls.model_fields["text"].default)
            bad = input_mismatches(config_cls, cfg.decoder.options(), inputs.get(text, {}))
            if bad:
                raise ConfigError(f"model.decoder.{bad[0]}")
            if text in towers and not getattr(getattr(towers[text], "cfg", None), "causal", False):
                raise ConfigError(
                    f"model.decoder: the '{text}' tower must be a causal text tower (causal: true)"
                )
            options = fill_inputs(config_cls, cfg.decoder.options(), inputs.get(text, {}))
            parsed = DECODERS.validate(cfg.decoder.decoder, options, "model.decoder")
            decoder = DECODERS.get(cfg.decoder.decoder)(parsed, {m: t.width for m, t in towers.items()})
        model = cls(towers, heads, cfg.embed_dim, fusion, decoder)
        for modality, spec in cfg.towers.items():
            model.locks[modality] = spec
            if spec.cache:
                model.caches[modality] = FeatureCache()
        return model

    def train(self, mode: bool = True) -> MultimodalModel:
        """As nn.Module's, but locked towers and frozen norms stay in eval mode (models/lock.py)."""
        super().train(mode)
        for modality, spec in self.locks.items():
            for m in frozen_modules(self.towers[modality], spec):
                m.eval()
        return self

    @property
    def modalities(self) -> list[str]:
        return list(self.towers)

    def features(self, modality: str, x: Any, **encoder_kwargs: Any) -> Features:
        tower = self._tower(modality)
        if isinstance(x, torch.Tensor) and x.ndim == tower.input_ndim + 1:
            return self._group_features(modality, x, **encoder_kwargs)
        cache = self.caches.get(modality)
        if cache is not None and not encoder_kwargs and isinstance(x, torch.Tensor):
            tokens, pooled = self._cached(tower, cache, x)
        else:
            tokens = tower(x, **encoder_kwargs)
            pooled = tower.pool(tokens)
        embedding = F.normalize(self.heads[modality](pooled).float(), dim=-1)
        return Features(tokens, pooled, embedding)

    @staticmethod
    @torch.no_grad()
    def _cached(tower: Encoder, cache: FeatureCache, x: torch.Tensor) -> tuple[Tokens, torch.Tensor]:
        """A locked tower's (tokens, pooled) of x, computing only the rows its cache lacks."""
        keys, missing = cache.lookup(x)
        fresh = {}
        if missing:
            out = tower(x[torch.tensor(missing, device=x.device)])
            pooled = tower.pool(out)
            for j, i in enumerate(missing):
                row = (out.tokens[j], None if out.mask is None else out.mask[j], pooled[j])
                fresh[i] = row
                cache.put(keys[i], *row)
        rows = [fresh[i] if i in fresh else cache.store[k] for i, k in enumerate(keys)]
        dtype = rows[0][0].dtype
        tokens = torch.stack([r[0].to(dtype) for r in rows])  # (B, N, D)
        mask = None if rows[0][1] is None else torch.stack([r[1] for r in rows])  # (B, N)
        return Tokens(tokens, mask), torch.stack([r[2].to(dtype) for r in rows])  # (B, D)

    def _group_features(self, modality: str, x: torch.Tensor, **encoder_kwargs: Any) -> Features:
        """(B, k, ...) -> encode the real items only (an all-padding caption would attend to nothing)."""
        B, k = x.shape[:2]
        flat = x.flatten(0, 1)  # (B * k, ...)
        valid = self.towers[modality].valid_items(flat)
        inner = self.features(modality, flat[valid], **encoder_kwargs)
        embedding = inner.embedding.new_zeros(B * k, inner.embedding.shape[-1])
        embedding[valid] = inner.embedding
        return Features(inner.tokens, inner.pooled, embedding.view(B, k, -1), valid.view(B, k))

    def token_embeddings(
        self, modality: str, x: Any, prefix: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every token of `x` in the shared space: (B, N, E) float32 L2-normalised embeddings and their
        (B, N) mask (None = all real). See `project_tokens`."""
        return self.project_tokens(modality, self.features(modality, x).tokens, prefix)

    def project_tokens(
        self, modality: str, tokens: Tokens, prefix: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token features (B, N, D) of `modality` -> projected, L2-normalised (B, N', E) float32 token
        embeddings and their (B, N') mask (None = all real).

        The head is the one that projects pooled features, applied to every token (it maps the last
        dimension), so token and pooled embeddings live in one space. The tower's prefix tokens (a
        ViT's CLS) are dropped unless `prefix`: late interaction (FILIP) scores content tokens."""
        skip = 0 if prefix else int(self._tower(modality).num_prefix_tokens)
        x, mask = tokens.tokens[:, skip:], None if tokens.mask is None else tokens.mask[:, skip:]
        return F.normalize(self.heads[modality](x).float(), dim=-1), mask

    def fuse(self, tokens_by_key: Mapping[str, Tokens | Features]) -> Tokens:
        """Fused tokens (B, N, D) of row-aligned token features of the fusion part's two towers (keyed
        by modality; the same B rows on both sides). Rows 0..N_query - 1 are the query's tokens, row
        0 the fused [CLS] (`models/fusion.py`)."""
        if self.fusion is None:
            raise RuntimeError("this model has no fusion part; add one under model.fusion in the recipe")

        def tokens(m: str) -> Tokens:
            if m not in tokens_by_key:
                raise KeyError(f"fusion needs the tokens of '{m}'; got {sorted(tokens_by_key)}")
            t = tokens_by_key[m]
            return t.tokens if isinstance(t, Features) else t

        return self.fusion(tokens(self.fusion.query), tokens(self.fusion.context))

    def encode(self, modality: str, x: Any) -> torch.Tensor:
        """(B, E) L2-normalised embeddings: the one function evaluation, search and serving use."""
        one = {modality: x}
        return self.features(modality, self.cut(one, self.trim_lengths(one))[modality]).embedding

    def trim_lengths(self, batch: dict[str, Any]) -> dict[str, int]:
        """{key: n} for each tower input of the batch whose last axis can be cut to its first n
        positions without changing any feature a tower computes (`Encoder.trimmed_length`: text
        padding). A cached tower's input is left whole: its cache keys rows by their full contents.
        Several ranks must agree on one n per key before cutting (`train/loop.py`)."""
        out = {}
        for key, value in batch.items():
            m = base_modality(key)
            if m in self.towers and m not in self.caches and isinstance(value, torch.Tensor):
                n = self.towers[m].trimmed_length(value)
                if n is not None:
                    out[key] = n
        return out

    @staticmethod
    def cut(batch: dict[str, Any], lengths: dict[str, int]) -> dict[str, Any]:
        """The batch with each key in `lengths` cut to its first n positions (last axis); the same
        dict when there is nothing to cut."""
        if all(batch[k].shape[-1] <= n for k, n in lengths.items()):
            return batch
        return {k: v[..., : lengths[k]] if k in lengths else v for k, v in batch.items()}

    def forward(self, batch: dict[str, Any]) -> dict[str, Features]:
        """Features for every key of the batch that a tower encodes: each modality the model has, and
        each view `<modality>@<view>` of one (encoded by that modality's tower), in the batch's order;
        a `StandIn` gives zero-row features."""
        out = {}
        for key, value in batch.items():
            if base_modality(key) not in self.towers:
                continue
            if isinstance(value, StandIn):
                out[key] = self.features(base_modality(key), value.row).without_rows()
            elif isinstance(value, torch.Tensor):
                out[key] = self.features(base_modality(key), value)
        return out

    def _tower(self, modality: str) -> Encoder:
        if modality not in self.towers:
            raise KeyError(f"this model has no '{modality}' tower; it has {', '.join(self.modalities)}")
        return self.towers[modality]
