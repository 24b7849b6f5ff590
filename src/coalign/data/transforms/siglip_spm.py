"""SigLIP's own tokenizer (`siglip_spm`): a SentencePiece model (`spiece.model`) read through
`transformers.SiglipTokenizer`, so the ids are SiglipTokenizer's by construction: lower case,
punctuation removed and whitespace collapsed (big_vision's canonicalisation), the pieces, `</s>` last,
padded to `context_length` with the pad token (`</s>` as released) and cut to it, `</s>` kept last.
This is what the released google/siglip-* folders carry (no tokenizer.json), so `coalign import hf`
reads them with it and `coalign export hf` writes the same `spiece.model` back.

`path` is a SigLIP model folder (spiece.model with its tokenizer_config.json) or a `.model` file;
without it, a SentencePiece unigram model of `vocab_size` pieces is trained on the captions (then
a run exports as a SigLIP folder whose tokenizer is SiglipTokenizer). The run keeps `spiece.model`
and `tokenizer_config.json` in its folder and reads them from there.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import torch

from coalign.data.sample import clean_text
from coalign.data.sources.base import Source
from coalign.data.transforms.specials import Specials
from coalign.data.transforms.text import BPETextTransform
from coalign.io import atomic_write_bytes, local_path
from coalign.registry import TRANSFORMS, StrictModel

SPIECE_FILE = "spiece.model"  # the name SiglipTokenizer reads in a folder
TOKENIZER_FILES = (SPIECE_FILE, "tokenizer_config.json", "special_tokens_map.json")


def _siglip_tokenizer_class():
    try:
        import sentencepiece  # noqa: F401
        from transformers import SiglipTokenizer
    except ImportError as err:
        raise ImportError(
            f"the siglip_spm tokenizer needs {err.name}: pip install 'coalign[convert]'"
        ) from None
    return SiglipTokenizer


class SiglipSPMConfig(StrictModel):
    context_length: int = pydantic.Field(64, ge=2)  # SigLIP's 64 (its `</s>` included)
    # a SigLIP folder (spiece.model, tokenizer_config.json) or a .model file; when unset, trained
    path: str | None = None
    vocab_size: int = pydantic.Field(1000, ge=8)  # the trained model's pieces; ignored with `path`
    fit_samples: int = pydantic.Field(20_000, ge=1)  # captions the model is trained on
    token_dropout: float = pydantic.Field(0.0, ge=0.0, lt=1.0)  # training only, as `bpe`'s
    captions: int = pydantic.Field(1, ge=1)  # training only, as `bpe`'s

    @classmethod
    def tiny(cls) -> dict:
        return {"context_length": 16, "vocab_size": 64, "fit_samples": 64}


def train_spiece(texts: list[str], vocab_size: int) -> bytes:
    """A SentencePiece unigram model (bytes of a spiece.model) on `texts`, with SigLIP's specials:
    <pad> 0, </s> 1, <unk> 2, no start token; at most `vocab_size` pieces (fewer if the text has
    fewer)."""
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=out,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    return out.getvalue()


def read_tokenizer(path: Path):
    """SiglipTokenizer from a folder with spiece.model (its tokenizer_config.json's options) or from a
    .model file, or a one-line error naming the file."""
    cls = _siglip_tokenizer_class()
    path = Path(path)
    if path.is_dir() and (path / SPIECE_FILE).is_file():
        load, where = (lambda: cls.from_pretrained(str(path), local_files_only=True)), path / SPIECE_FILE
    elif path.is_file():
        load, where = (lambda: cls(vocab_file=str(path))), path
    else:
        raise FileNotFoundError(
            f"SentencePiece model '{path}' not found (a SigLIP folder with {SPIECE_FILE}, or a .model file)"
        )
    try:
        tok = load()
    except (RuntimeError, OSError, ValueError) as err:  # sentencepiece's parse error, a bad config
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"'{where}' is not a SentencePiece model SiglipTokenizer reads ({first})") from None
    if tok.eos_token_id is None or tok.pad_token_id is None:
        raise ValueError(f"'{where}': its tokenizer has no eos_token or pad_token; SigLIP needs both")
    return tok


@TRANSFORMS.register("siglip_spm")
class SiglipSPMTransform(BPETextTransform):
    """`bpe`'s sampling of captions (one per step, or groups of k), with SigLIP's tokenizer."""

    Config = SiglipSPMConfig
    modality = "text"
    shared_with_views = ("context_length", "path", "vocab_size", "fit_samples")

    def __init__(self, cfg: SiglipSPMConfig | None = None, **kwargs):
        self.cfg = cfg or SiglipSPMConfig(**kwargs)
        self.tokenizer = None
        self.specials = Specials(0, None, 1)  # replaced by the tokenizer's own once read
        if self.cfg.path:
            self._use(local_path(self.cfg.path))

    def _use(self, path: Path) -> None:
        tok = read_tokenizer(path)
        tok.model_max_length = self.cfg.context_length
        tok.init_kwargs["model_max_length"] = self.cfg.context_length  # what save_pretrained writes
        self.tokenizer = tok
        self.specials = Specials(tok.pad_token_id, None, tok.eos_token_id)

    def fit(self, source: Source | None, run_dir: Path | None) -> None:
        if self.tokenizer is None:
            texts = source.captions(self.cfg.fit_samples) if source is not None else []
            if not texts:
                raise ValueError("cannot train a SentencePiece model: no `path` and no training captions")
            with tempfile.TemporaryDirectory() as tmp:
                model = Path(tmp) / SPIECE_FILE
                model.write_bytes(train_spiece(texts, self.cfg.vocab_size))
                self._use(model)  # the tokenizer keeps the proto in memory; the file may go
                if run_dir is not None:
                    self._save_files(Path(tmp), run_dir)
            return
        if run_dir is not None:
            self.save(run_dir)

    def _save_files(self, tmp: Path, run_dir: Path) -> None:
        """save_pretrained into `tmp`, then each tokenizer file into the run atomically."""
        folder = tmp / "saved"
        self.tokenizer.save_pretrained(str(folder))
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                atomic_write_bytes(Path(run_dir) / name, (folder / name).read_bytes())

    def save(self, run_dir: Path) -> None:
        if self.tokenizer is None:
            raise RuntimeError("nothing to save: the SentencePiece model is neither trained nor loaded")
        with tempfile.TemporaryDirectory() as tmp:
            self._save_files(Path(tmp), run_dir)

    def load(self, run_dir: Path) -> None:
        self._use(Path(run_dir))

    def encode(self, texts: list[str], rng: np.random.Generator | None = None) -> torch.Tensor:
        """(B, context_length) ids, equal to `SiglipTokenizer(texts, padding="max_length",
        max_length=context_length, truncation=True)`."""
        if self.tokenizer is None:
            raise RuntimeError("the SentencePiece model is not loaded; set `path`, or call fit()/load()")
        L, tok = self.cfg.context_length, self.tokenizer
        texts = [clean_text(t) for t in texts]  # a lone surrogate would make the tokenizer raise
        if rng is None or self.cfg.token_dropout == 0:
            ids = tok(texts, padding="max_length", max_length=L, truncation=True)["input_ids"]
            return torch.tensor(ids, dtype=torch.long).reshape(len(texts), L)
        out = torch.full((len(texts), L), self.specials.pad, dtype=torch.long)
        for row, words in enumerate(tok(texts, add_special_tokens=False)["input_ids"]):
            if len(words) > 1:
                keep = rng.random(len(words)) >= self.cfg.token_dropout
                words = [t for t, k in zip(words, keep, strict=True) if k] or [
                    words[int(rng.integers(len(words)))]
                ]
            ids = [*words[: L - 1], self.specials.eos]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def special_ids(self) -> list[int]:
        return sorted(set(self.tokenizer.all_special_ids)) if self.tokenizer is not None else [0, 1]

    def describe(self) -> dict[str, Any]:
        info = {"context_length": self.cfg.context_length, "pad_id": self.specials.pad}
        if self.tokenizer is not None:
            info |= {"vocab_size": len(self.tokenizer), "eos_id": self.specials.eos}
        return info

    @classmethod
    def describe_config(cls, cfg: SiglipSPMConfig) -> dict[str, Any]:
        return {"context_length": cfg.context_length}
