"""Text transform: a byte-level BPE tokenizer (trained on the recipe's captions, or loaded from a
local `tokenizer.json`) that turns a caption into fixed-length token ids `<bos> ... <eos> <pad>*`.

A loaded tokenizer keeps its own special tokens (`specials.py`): a BERT-family `tokenizer.json` pads
with `[PAD]` and writes `[CLS] ... [SEP]`, whatever their ids; a trained one uses coalign's
`<pad>, <bos>, <eos>` at ids 0-2.

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
from coalign.data.transforms.specials import Specials, find_specials
from coalign.io import atomic_write_text, local_path
from coalign.registry import TRANSFORMS, StrictModel

SPECIALS = ["<pad>", "<bos>", "<eos>"]
PAD, BOS, EOS = 0, 1, 2
TOKENIZER_FILE = "tokenizer.json"


BYTE_ALPHABET = 256  # byte-level BPE starts from every byte, so a vocabulary holds at least these


class BPEConfig(StrictModel):
    context_length: int = 32  # tokens per caption, <bos> and <eos> included; longer captions are cut
    vocab_size: int = 1000  # ignored with `path`
    # a local tokenizer.json or a model folder holding one (or package:NAME/inside, io.local_path);
    # when unset, one is trained on the captions
    path: str | None = None
    # With `path`: the tokenizer's padding, start and end tokens by name, where it does not say itself
    # (`specials.py` reads its padding, its post-processor's template, then well-known names).
    pad_token: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
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
        self.specials = Specials(PAD, BOS, EOS)  # those of a trained tokenizer
        self._source_json: str | None = None  # the file as read, saved unchanged into the run
        if self.cfg.path:
            self._read(local_path(self.cfg.path))

    def _read(self, path: Path) -> None:
        if path.is_dir() and (path / TOKENIZER_FILE).is_file():
            path = path / TOKENIZER_FILE  # a Hugging Face model folder
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file '{path}' not found")
        text = path.read_text(encoding="utf-8")
        tok = Tokenizer.from_str(text)
        names = (self.cfg.pad_token, self.cfg.bos_token, self.cfg.eos_token)
        self.specials = find_specials(tok, names, str(path))
        # Its own padding and truncation would pad every caption to a fixed length before ours
        tok.no_padding()
        tok.no_truncation()
        self.tokenizer, self._source_json = tok, text

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
        target = Path(run_dir) / TOKENIZER_FILE
        if self._source_json is not None:  # as read: its padding and post-processor name its specials
            atomic_write_text(target, self._source_json)
        else:
            self.tokenizer.save(str(target))

    def load(self, run_dir: Path) -> None:
        self._read(run_dir / TOKENIZER_FILE)

    def encode(self, texts: list[str], rng: np.random.Generator | None = None) -> torch.Tensor:
        """(B, context_length) ids; long captions are cut, keeping <eos> last. With `rng` (training
        views, as TCL's), each token is dropped with probability `token_dropout`, keeping at least one."""
        if self.tokenizer is None:
            raise RuntimeError("the tokenizer is neither trained nor loaded; call fit() or load()")
        L, sp = self.cfg.context_length, self.specials
        start, end = [sp.bos] if sp.bos is not None else [], [sp.eos] if sp.eos is not None else []
        room = L - len(start) - len(end)
        out = torch.full((len(texts), L), sp.pad, dtype=torch.long)
        texts = [clean_text(t) for t in texts]  # a lone surrogate would make the tokenizer raise
        for row, enc in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            tokens = enc.ids
            if rng is not None and self.cfg.token_dropout > 0 and len(tokens) > 1:
                keep = rng.random(len(tokens)) >= self.cfg.token_dropout
                tokens = [t for t, k in zip(tokens, keep, strict=True) if k] or [
                    tokens[int(rng.integers(len(tokens)))]
                ]
            ids = [*start, *tokens[:room], *end]
            if ids:
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
        return torch.cat([ids, ids.new_full((k - ids.shape[0], ids.shape[1]), self.specials.pad)])  # (k, L)

    def decode(self, ids: list[int]) -> str:
        """The text of token ids, special tokens left out (captioning turns generated ids back into
        words; the text is `encode`'s input after the tokenizer's normalisation: lower case, NFKC)."""
        if self.tokenizer is None:
            raise RuntimeError("the tokenizer is neither trained nor loaded; call fit() or load()")
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def special_ids(self) -> list[int]:
        """The ids that are no word (padding, start, end, and every token the tokenizer marks special,
        such as [UNK] and [MASK]): masked language modelling never masks, draws or predicts them."""
        if self.tokenizer is None:
            return list(range(len(SPECIALS)))
        added = [i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special]
        return sorted({*self.specials.ids(), *added})

    def describe(self) -> dict[str, Any]:
        size = self.tokenizer.get_vocab_size() if self.tokenizer is not None else self.cfg.vocab_size
        return {"vocab_size": size, "context_length": self.cfg.context_length, "pad_id": self.specials.pad}

    @classmethod
    def describe_config(cls, cfg: BPEConfig) -> dict[str, Any]:
        # A tokenizer file's size and padding id are known only once it is read; a trained one pads
        # with id 0 and holds at most vocab_size tokens.
        known = {"context_length": cfg.context_length}
        return known if cfg.path else {**known, "pad_id": PAD, "vocab_size": cfg.vocab_size}
