"""Text transform: a byte-level BPE tokenizer (trained on the recipe's captions, or loaded from a
local `tokenizer.json`) that turns a caption into fixed-length token ids `<bos> ... <eos> <pad>*`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from coalign.data.sources.base import SampleError, Source
from coalign.data.transforms.base import Transform
from coalign.registry import TRANSFORMS, StrictModel

SPECIALS = ["<pad>", "<bos>", "<eos>"]
PAD, BOS, EOS = 0, 1, 2
TOKENIZER_FILE = "tokenizer.json"


class BPEConfig(StrictModel):
    context_length: int = 32
    vocab_size: int = 1000
    path: str | None = None  # a local tokenizer.json; when unset, one is trained on the captions
    fit_samples: int = 20_000  # how many training samples' captions to fit the tokenizer on
    token_dropout: float = pydantic.Field(
        0.0, ge=0.0, lt=1.0
    )  # training only: drop each token with this chance


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


@TRANSFORMS.register("bpe")
class BPETextTransform(Transform):
    Config = BPEConfig

    def __init__(self, cfg: BPEConfig | None = None, **kwargs):
        self.cfg = cfg or BPEConfig(**kwargs)
        self.tokenizer: Tokenizer | None = None
        if self.cfg.path:
            self.tokenizer = self._read(Path(self.cfg.path))

    @staticmethod
    def _read(path: Path) -> Tokenizer:
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file '{path}' not found")
        tok = Tokenizer.from_file(str(path))
        for i, special in enumerate(SPECIALS):
            if tok.token_to_id(special) != i:
                raise ValueError(f"tokenizer '{path}' must have {SPECIALS} as ids 0..2")
        return tok

    def fit(self, source: Source, run_dir: Path | None) -> None:
        if self.tokenizer is None:
            texts = [t for t in source.captions(self.cfg.fit_samples) if t and t.strip()]
            if not texts:
                raise ValueError("cannot train a tokenizer: the training source has no captions")
            self.tokenizer = train_bpe(texts, self.cfg.vocab_size)
        if run_dir is not None:
            self.tokenizer.save(str(run_dir / TOKENIZER_FILE))

    def load(self, run_dir: Path) -> None:
        self.tokenizer = self._read(run_dir / TOKENIZER_FILE)

    def encode(self, texts: list[str], rng: np.random.Generator | None = None) -> torch.Tensor:
        """(B, context_length) ids; long captions are cut, keeping <eos> last. With `rng` (training
        views, as TCL's), each token is dropped with probability `token_dropout`, keeping at least one."""
        if self.tokenizer is None:
            raise RuntimeError("the tokenizer is neither trained nor loaded; call fit() or load()")
        L = self.cfg.context_length
        out = torch.full((len(texts), L), PAD, dtype=torch.long)
        for row, enc in enumerate(self.tokenizer.encode_batch(list(texts), add_special_tokens=False)):
            tokens = enc.ids
            if rng is not None and self.cfg.token_dropout > 0 and len(tokens) > 1:
                keep = rng.random(len(tokens)) >= self.cfg.token_dropout
                tokens = [t for t, k in zip(tokens, keep, strict=True) if k] or [
                    tokens[int(rng.integers(len(tokens)))]
                ]
            ids = [BOS, *tokens[: L - 2], EOS]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def __call__(self, value: Any, rng: np.random.Generator) -> torch.Tensor:
        texts = [value] if isinstance(value, str) else list(value or [])
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        if not texts:
            raise SampleError("empty_caption")
        text = texts[int(rng.integers(len(texts)))] if self.train else texts[0]
        return self.encode([text], rng if self.train else None)[0]  # (L,)

    def describe(self) -> dict[str, Any]:
        size = self.tokenizer.get_vocab_size() if self.tokenizer is not None else self.cfg.vocab_size
        return {"vocab_size": size, "context_length": self.cfg.context_length, "pad_id": PAD}
