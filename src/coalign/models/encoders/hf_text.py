"""A text tower from a local Hugging Face `transformers` encoder folder (BERT, RoBERTa, MiniLM, ...).

    towers:
      text: {encoder: hf_text, path: /models/all-MiniLM-L6-v2, pool: auto, lock: true}
    transforms:
      text: {transform: bpe, path: /models/all-MiniLM-L6-v2, context_length: 32}  # its own tokenizer

`path` is a folder that `AutoModel.from_pretrained` reads (config.json and the weights); nothing is
downloaded (`local_files_only`). Without `path`, `arch` builds a randomly initialised model from a
transformers config (`{model_type: bert, hidden_size: 32, ...}`): tests, and towers trained from
scratch with a familiar architecture. The pad id (and so the attention mask) comes from the
tokenizer the text transform reads, vocab_size and context_length likewise.

Pooling: `mean` over real tokens or `cls` (the first token); `auto` reads a sentence-transformers
folder's `1_Pooling/config.json` (all-MiniLM-L6-v2: mean) and uses `cls` without one. The model's
own pooler layer (BERT's tanh dense over [CLS], trained for next-sentence prediction) is dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pydantic
import torch
from torch import nn

from coalign.io import local_path
from coalign.models.encoders.base import (
    Encoder,
    EncoderConfig,
    Positive,
    Tokens,
    masked_mean,
    used_positions,
)
from coalign.registry import ENCODERS

POOLING_FILE = Path("1_Pooling") / "config.json"  # sentence-transformers' pooling module


class HFTextConfig(EncoderConfig):
    inputs_at_least = ("vocab_size", "context_length")

    path: str | None = None  # a local transformers model folder, or package:NAME/inside (io.local_path)
    arch: dict[str, Any] | None = None  # without path: a transformers config, randomly initialised
    depth: Positive | None = None  # keep only the first `depth` layers; None: all
    pool: Literal["auto", "mean", "cls"] = "auto"
    vocab_size: Positive | None = None  # the tokenizer's; the model's table must hold it
    context_length: Positive | None = None  # the tokenizer's; the model's positions must cover it
    pad_id: int = pydantic.Field(0, ge=0)

    @classmethod
    def tiny(cls) -> dict:
        # The arch is used only without `path`: a pretrained folder keeps its width, and --smoke its
        # first layer.
        arch = {
            "model_type": "bert",
            "hidden_size": 32,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
        }
        return {"depth": 1, "arch": {**arch, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}

    @pydantic.model_validator(mode="after")
    def _a_source(self) -> HFTextConfig:
        if self.path is None and self.arch is None:
            raise ValueError("hf_text needs path (a local transformers model folder) or arch (a config)")
        if self.path is not None and not local_path(self.path).is_dir():
            raise ValueError(
                f"path '{self.path}' is not a folder (a local transformers model: config.json, weights)"
            )
        if self.path is None and "model_type" not in (self.arch or {}):
            raise ValueError("arch needs model_type (e.g. bert), as a transformers config.json has")
        return self


def stack_of_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer layers: its longest ModuleList (BERT's `encoder.layer`)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} holds no stack of layers (no ModuleList)")
    return max(lists, key=len)


def sentence_pooling(path: Path) -> str | None:
    """'mean' or 'cls' from a sentence-transformers folder's pooling config, or None without one."""
    file = path / POOLING_FILE
    if not file.is_file():
        return None
    cfg = json.loads(file.read_text())
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    modes = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode") and v)
    raise ValueError(f"'{file}' pools by {modes}; hf_text pools by mean or cls (set pool explicitly)")


@ENCODERS.register("hf_text")
class HFText(Encoder):
    Config = HFTextConfig
    modality = "text"
    input_ndim = 2

    def __init__(self, cfg: HFTextConfig):
        super().__init__()
        import transformers  # the `pretrained` extra; imported only when such a tower is built

        self.cfg = cfg
        if cfg.path is not None:
            self.model = transformers.AutoModel.from_pretrained(local_path(cfg.path), local_files_only=True)
        else:
            arch = dict(cfg.arch or {})
            if cfg.vocab_size is not None:
                arch["vocab_size"] = cfg.vocab_size
            if cfg.context_length is not None:
                arch.setdefault("max_position_embeddings", max(cfg.context_length, 8))
            arch["pad_token_id"] = cfg.pad_id
            self.model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(**arch))
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # coalign pools itself; an unused layer would get no gradient
        layers = stack_of_layers(self.model)
        if cfg.depth is not None:
            if cfg.depth > len(layers):
                raise ValueError(f"depth {cfg.depth} is more than the model's {len(layers)} layers")
            del layers[cfg.depth :]
        self._check_inputs()
        self.width = int(self.model.config.hidden_size)
        self.pooling = cfg.pool
        if self.pooling == "auto":
            self.pooling = (sentence_pooling(local_path(cfg.path)) if cfg.path else None) or "cls"

    def _check_inputs(self) -> None:
        config = self.model.config
        rows = self.model.get_input_embeddings().num_embeddings
        if self.cfg.vocab_size is not None and self.cfg.vocab_size > rows:
            raise ValueError(
                f"the tokenizer has {self.cfg.vocab_size} tokens but the model's table {rows}: use the "
                "model's own tokenizer (data.transforms.text.path: the model folder)"
            )
        positions = getattr(config, "max_position_embeddings", None)
        if (
            self.cfg.context_length is not None
            and positions is not None
            and self.cfg.context_length > positions
        ):
            raise ValueError(
                f"context_length {self.cfg.context_length} is more than the model's {positions} positions"
            )

    def valid_items(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids != self.cfg.pad_id).any(dim=1)

    def lock_blocks(self) -> list[nn.Module]:
        return list(stack_of_layers(self.model))

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        m = self.model
        if hasattr(m, "activation_checkpointing_enable"):  # transformers 5 (the older names warn)
            if enabled:
                m.activation_checkpointing_enable({"use_reentrant": False})
            elif m.is_activation_checkpointing:
                m.activation_checkpointing_disable()
        elif enabled:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif m.is_gradient_checkpointing:
            m.gradient_checkpointing_disable()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, D) input token embeddings (before positions), for CoOp and MLM."""
        return self.model.get_input_embeddings()(ids)

    def trimmed_length(self, ids: torch.Tensor) -> int | None:
        """Up to the last token that is not pad_id in any row: padding is out of the attention mask
        and of both poolings, and positions count from 0 whatever the width."""
        if ids.shape[-1] == 0:
            return None
        return used_positions(ids.reshape(-1, ids.shape[-1]) != self.cfg.pad_id)

    def forward(self, ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> Tokens:
        """ids: (B, L) long, padded with pad_id; `token_embeds` (B, L, D) replaces `embed(ids)`."""
        valid = ids != self.cfg.pad_id  # (B, L)
        inputs = {"input_ids": ids} if token_embeds is None else {"inputs_embeds": token_embeds}
        out = self.model(**inputs, attention_mask=valid.long())
        return Tokens(out.last_hidden_state, valid)

    def pool(self, out: Tokens) -> torch.Tensor:
        if self.pooling == "mean":
            return masked_mean(out.tokens, out.mask)
        return out.tokens[:, 0]

    @classmethod
    def example_input(cls, cfg: HFTextConfig, batch: int = 2) -> torch.Tensor:
        ids = torch.randint(cfg.pad_id + 1, cfg.vocab_size, (batch, cfg.context_length))
        ids[0, cfg.context_length // 2 :] = cfg.pad_id  # one padded row
        return ids
