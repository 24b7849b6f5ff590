"""Text transform: a byte-level BPE tokenizer (trained on the recipe's captions, or loaded from a
local `tokenizer.json`) that turns a caption into fixed-length token ids `<bos> ... <eos> <pad>*`.

A sample may carry several captions. How many a training step sees is `captions`:
- `captions: 1` (the default) draws one caption per sample per step, at random: over epochs every
  caption is used, one at a time (CLIP's practice with COCO's five captions).
- `captions: k` returns up to k distinct captions per sample, as a (k, L) group padded with
  all-<pad> rows; put it on a view such as `text@all` and an objective such as `multi_positive`
  treats all of them as positives of the sample's image at once (DreamLIP).
Evaluation always encodes the first caption, whatever `captions` says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from coalign.data.sample import captions, clean_text
from coalign.data.sources.base import SampleError, Source
from coalign.data.transforms.base import Transform
from coalign.registry import TRANSFORMS, StrictModel

SPECIALS = ["<pad>", "<bos>", "<eos>"]
PAD, BOS, EOS = 0, 1, 2
TOKENIZER_FILE = "tokenizer.json"


BYTE_ALPHABET = 256  # byte-level BPE starts from every byte, so a vocabulary holds at least these


class BPEConfig(StrictModel):
    context_length: int = 32  # tokens per caption, <bos> and <eos> included; longer captions are cut
    vocab_size: int = 1000  # ignored with `path`
    path: str | None = None  # a local tokenizer.json; when unset, one is trained on the captions
    fit_samples: int = pydantic.Field(
        20_000, ge=1
    )  # how many training samples' captions to fit the tokenizer on
    token_dropout: float = pydantic.Field(
        0.0, ge=0.0, lt=1.0
    )  # training only: drop each token with this chance
    # training only: captions per sample per step; k > 1 gives (k, L) groups (see the module docstring)
    captions: int = pydantic.Field(1, ge=1)

    @classmethod
    def tiny(cls) -> dict:
        return {"vocab_size": 300, "context_length": 16, "fit_samples": 64}

    @pydantic.field_validator("context_length")
    @classmethod
    def _room_for_a_word(cls, v: int) -> int:
        if v < 3:
            raise ValueError(f"must be at least 3 (<bos>, one token, <eos>), got {v}")
        return v

    @pydantic.field_validator("vocab_size")
    @classmethod
    def _holds_the_bytes(cls, v: int) -> int:
        least = BYTE_ALPHABET + len(SPECIALS)
        if v < least:
            raise ValueError(
                f"must be at least {least}, got {v}: a byte-level BPE holds all {BYTE_ALPHABET} bytes "
                f"and {len(SPECIALS)} special tokens before it learns any merge"
            )
        return v


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
    modality = "text"
    shared_with_views = ("context_length", "vocab_size", "path", "fit_samples")

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
            texts = source.captions(self.cfg.fit_samples)  # cleaned and non-blank (sample.captions)
            if not texts:
                raise ValueError("cannot train a tokenizer: the training source has no captions")
            self.tokenizer = train_bpe(texts, self.cfg.vocab_size)
        if run_dir is not None:
            self.save(run_dir)

    def save(self, run_dir: Path) -> None:
        if self.tokenizer is None:
            raise RuntimeError("nothing to save: the tokenizer is neither trained nor loaded")
        self.tokenizer.save(str(Path(run_dir) / TOKENIZER_FILE))

    def load(self, run_dir: Path) -> None:
        self.tokenizer = self._read(run_dir / TOKENIZER_FILE)

    def encode(self, texts: list[str], rng: np.random.Generator | None = None) -> torch.Tensor:
        """(B, context_length) ids; long captions are cut, keeping <eos> last. With `rng` (training
        views, as TCL's), each token is dropped with probability `token_dropout`, keeping at least one."""
        if self.tokenizer is None:
            raise RuntimeError("the tokenizer is neither trained nor loaded; call fit() or load()")
        L = self.cfg.context_length
        out = torch.full((len(texts), L), PAD, dtype=torch.long)
        texts = [clean_text(t) for t in texts]  # a lone surrogate would make the tokenizer raise
        for row, enc in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
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
        texts = captions(value)
        if not texts:
            raise SampleError("empty_caption")
        if not self.train:
            return self.encode(texts[:1])[0]  # (L,)
        k = self.cfg.captions
        if k == 1:
            return self.encode([texts[int(rng.integers(len(texts)))]], rng)[0]  # (L,)
        picked = rng.choice(len(texts), size=min(k, len(texts)), replace=False)
        ids = self.encode([texts[int(i)] for i in picked], rng)  # (n, L), n <= k
        # all-<pad> rows mark "no caption": the model skips them and reports them in group_mask
        return torch.cat([ids, ids.new_full((k - ids.shape[0], ids.shape[1]), PAD)])  # (k, L)

    def special_ids(self) -> list[int]:
        """The ids that are no word (<pad>, <bos>, <eos>): masked language modelling never masks,
        draws or predicts them."""
        return list(range(len(SPECIALS)))

    def describe(self) -> dict[str, Any]:
        size = self.tokenizer.get_vocab_size() if self.tokenizer is not None else self.cfg.vocab_size
        return {"vocab_size": size, "context_length": self.cfg.context_length, "pad_id": PAD}

    @classmethod
    def describe_config(cls, cfg: BPEConfig) -> dict[str, Any]:
        # A tokenizer file's size is known only once it is read; a trained one is at most vocab_size.
        known = {"context_length": cfg.context_length, "pad_id": PAD}
        return known if cfg.path else {**known, "vocab_size": cfg.vocab_size}
