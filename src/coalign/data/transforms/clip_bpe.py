"""CLIP's own BPE tokenizer (`clip_bpe`): the token ids `open_clip.tokenize` gives, so that a converted
OpenCLIP or Hugging Face CLIP text tower reads the inputs it was trained on.

The vocabulary is OpenAI's 49,408-token BPE: 256 byte symbols, the same 256 ending a word (`</w>`),
48,894 merges and `<start_of_text>`, `<end_of_text>` (ids 49406, 49407). It is read from the file
`open_clip` ships (`bpe_simple_vocab_16e6.txt.gz`) or from a Hugging Face `CLIPTokenizer` folder
(`vocab.json` + `merges.txt`, which hold the same table), and saved into the run folder in the
latter form so that an exported run carries it.

Encoding does what OpenAI's `SimpleTokenizer` does, in its order: ftfy's `fix_text`, HTML entities
unescaped twice, whitespace collapsed, lower case; then CLIP's word pattern (contractions, letter
runs, single digits, runs of other symbols), each word's UTF-8 bytes mapped to byte symbols, and the
merges applied by rank, through the `tokenizers` library's BPE model. A row is
`<start_of_text> ... <end_of_text>` zero-padded to `context_length`; a longer one is cut and ends in
`<end_of_text>`. Padding is id 0, which is also the token `!`: the text tower finds a row's end by its
`<end_of_text>` (`eos_id`), not by the padding.
"""

from __future__ import annotations

import gzip
import html
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import torch

from coalign.data.sample import clean_text
from coalign.data.sources.base import Source
from coalign.data.transforms.specials import Specials
from coalign.data.transforms.text import BPETextTransform
from coalign.io import atomic_write_text
from coalign.registry import TRANSFORMS, StrictModel

VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"  # the names Hugging Face's CLIPTokenizer reads
SOT, EOT = "<|startoftext|>", "<|endoftext|>"  # as Hugging Face names them in vocab.json
OPENCLIP_SPECIALS = ("<start_of_text>", "<end_of_text>")  # as open_clip names (and matches) them
N_MERGES = 49152 - 256 - 2  # OpenAI's table: 48,894 merges, so 49,408 tokens in all
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@lru_cache
def byte_symbols() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes onto printable characters (what CLIP's BPE works on),
    in the vocabulary's order: the printable bytes first, each itself, then the rest from U+0100 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = dict(zip(keep, keep, strict=True)), 0
    for b in range(256):
        if b not in codes:
            codes[b], extra = 256 + extra, extra + 1
    return {b: chr(c) for b, c in codes.items()}


def openclip_vocabulary() -> Path | None:
    """The BPE file of the installed `open_clip` package (found without importing it), or None."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(folder).glob("bpe_simple_vocab_*.txt.gz"))
        if found:
            return found[0]
    return None


def read_vocabulary(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges in rank order) from open_clip's `.txt.gz` or a folder of vocab.json +
    merges.txt (a Hugging Face CLIPTokenizer folder, or a coalign run that uses `clip_bpe`)."""
    path = Path(path)
    if path.is_dir():
        vocab_path, merges_path = path / VOCAB_FILE, path / MERGES_FILE
        missing = [p.name for p in (vocab_path, merges_path) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"CLIP vocabulary folder '{path}' has no {' or '.join(missing)}")
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        lines = merges_path.read_text(encoding="utf-8").split("\n")
        merges = [tuple(m.split()) for m in lines if m and not m.startswith("#version")]
    elif path.is_file():
        with gzip.open(path) as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in lines[1 : N_MERGES + 1]]  # line 0 is a version header
        symbols = list(byte_symbols().values())
        tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), SOT, EOT]
        vocab = {t: i for i, t in enumerate(tokens)}
    else:
        raise FileNotFoundError(
            f"CLIP vocabulary '{path}' not found (a bpe_simple_vocab_16e6.txt.gz as open_clip ships it, "
            "or a folder with vocab.json and merges.txt)"
        )
    bad = [m for m in merges if len(m) != 2]
    if bad or SOT not in vocab or EOT not in vocab:
        raise ValueError(f"'{path}' is not a CLIP BPE vocabulary (merges of two symbols, {SOT} and {EOT})")
    return vocab, merges  # type: ignore[return-value]


def _file_keys(path: Path) -> tuple:
    """What identifies the vocabulary's file(s) on disk (a renamed run folder keeps them)."""
    files = [path / VOCAB_FILE, path / MERGES_FILE] if path.is_dir() else [path]
    stats = [f.stat() for f in files if f.exists()]
    return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


_TABLES: dict[tuple, tuple] = {}  # _file_keys -> (vocab, merges, BPE model); a few at most


def _table(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], Any]:
    """The vocabulary and its BPE model, built once per file (keyed by the files' identity, so a
    run folder renamed into place still hits): building the model from 49k merges takes about a
    second, and an import, its check and every later load read the same table."""
    from tokenizers import Tokenizer, models

    keys = _file_keys(path)
    if keys not in _TABLES:
        vocab, merges = read_vocabulary(path)
        # No normaliser or pre-tokeniser: words arrive split and byte-mapped; the model only merges.
        tokenizer = Tokenizer(models.BPE(vocab, merges, end_of_word_suffix="</w>"))
        if len(_TABLES) >= 4:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[keys] = (vocab, merges, tokenizer)
    return _TABLES[keys]


def write_vocabulary(vocab: dict[str, int], merges: list[tuple[str, str]], folder: Path) -> None:
    """vocab.json + merges.txt, as Hugging Face's CLIPTokenizer reads them."""
    atomic_write_text(folder / VOCAB_FILE, json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(folder / MERGES_FILE, "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def _text_libraries():
    try:
        import ftfy
        import regex
    except ImportError as err:
        raise ImportError(
            f"the clip_bpe tokenizer needs {err.name}: pip install 'coalign[convert]'"
        ) from None
    return ftfy, regex


class ClipBPEConfig(StrictModel):
    context_length: int = pydantic.Field(77, ge=2)  # CLIP's 77; <start_of_text> and <end_of_text> included
    # open_clip's bpe_simple_vocab_16e6.txt.gz, or a folder with vocab.json + merges.txt; a run reads
    # the copy saved in its own folder
    path: str | None = None
    token_dropout: float = pydantic.Field(0.0, ge=0.0, lt=1.0)  # training only, as `bpe`'s
    captions: int = pydantic.Field(1, ge=1)  # training only, as `bpe`'s

    @classmethod
    def tiny(cls) -> dict:
        vocab = openclip_vocabulary()
        return {"context_length": 16, **({"path": str(vocab)} if vocab else {})}


@TRANSFORMS.register("clip_bpe")
class ClipBPETransform(BPETextTransform):
    """`bpe`'s sampling of captions (one per step, or groups of k), with CLIP's tokenizer."""

    Config = ClipBPEConfig
    modality = "text"
    shared_with_views = ("context_length", "path")

    def __init__(self, cfg: ClipBPEConfig | None = None, **kwargs):
        self.cfg = cfg or ClipBPEConfig(**kwargs)
        self.vocab: dict[str, int] | None = None
        self.tokenizer = None
        if self.cfg.path:
            self._use(Path(self.cfg.path))

    def _use(self, path: Path) -> None:
        ftfy, regex = _text_libraries()
        if not path.exists():
            read_vocabulary(path)  # raises the one-line error
        self.vocab, self.merges, self.tokenizer = _table(path)
        vocab = self.vocab
        self.sot, self.eot = vocab[SOT], vocab[EOT]
        self.specials = Specials(0, self.sot, self.eot)  # pads with 0 (also '!'), as open_clip does
        self._inverse: dict[int, str] | None = None
        specials = "|".join(regex.escape(s) for s in OPENCLIP_SPECIALS)
        self._words = regex.compile(f"{specials}|{WORD_PATTERN}", regex.IGNORECASE)
        self._fix = ftfy.fix_text
        self._specials = dict(zip(OPENCLIP_SPECIALS, (self.sot, self.eot), strict=True))

    def clean(self, text: str) -> str:
        """open_clip's 'lower' cleaning: ftfy, HTML unescaped twice, whitespace collapsed, lower case."""
        text = html.unescape(html.unescape(self._fix(clean_text(text)))).strip()
        return " ".join(text.split()).lower()

    def word_ids(self, text: str) -> list[int]:
        """The ids of one caption, without <start_of_text> and <end_of_text>."""
        words = self._words.findall(self.clean(text))
        if not words:
            return []
        symbols = byte_symbols()
        plain = ["".join(symbols[b] for b in w.encode("utf-8")) for w in words if w not in self._specials]
        by_word: dict[int, list[int]] = {}
        if plain:
            enc = self.tokenizer.encode(plain, is_pretokenized=True)
            for piece, word in zip(enc.ids, enc.word_ids, strict=True):
                by_word.setdefault(word, []).append(piece)
        ids: list[int] = []
        n = 0
        for w in words:
            if w in self._specials:
                ids.append(self._specials[w])
            else:
                ids += by_word[n]
                n += 1
        return ids

    def fit(self, source: Source | None, run_dir: Path | None) -> None:
        if self.vocab is None:
            raise ValueError(
                "clip_bpe needs `path`: open_clip's bpe_simple_vocab_16e6.txt.gz or a vocab folder"
            )
        if run_dir is not None:
            write_vocabulary(self.vocab, self.merges, Path(run_dir))
            _TABLES[_file_keys(Path(run_dir))] = (self.vocab, self.merges, self.tokenizer)  # the same table

    def load(self, run_dir: Path) -> None:
        self._use(Path(run_dir))

    def encode(self, texts: list[str], rng: np.random.Generator | None = None) -> torch.Tensor:
        """(B, context_length) ids, equal to `open_clip.tokenize(texts, context_length)`."""
        if self.tokenizer is None:
            raise RuntimeError("the CLIP vocabulary is not loaded; set `path`, or call load()")
        L = self.cfg.context_length
        out = torch.zeros((len(texts), L), dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = self.word_ids(text)
            if rng is not None and self.cfg.token_dropout > 0 and len(tokens) > 1:
                keep = rng.random(len(tokens)) >= self.cfg.token_dropout
                tokens = [t for t, k in zip(tokens, keep, strict=True) if k] or [tokens[0]]
            ids = [self.sot, *tokens, self.eot][:L]
            ids[-1] = self.eot
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: list[int]) -> str:
        """The text of token ids (CLIP's `SimpleTokenizer.decode`): symbols back to bytes, each
        word-final `</w>` a space; the start and end tokens left out."""
        if self.vocab is None:
            raise RuntimeError("the CLIP vocabulary is not loaded; set `path`, or call load()")
        if self._inverse is None:
            self._inverse = {i: t for t, i in self.vocab.items()}
        to_byte = {c: b for b, c in byte_symbols().items()}
        text = "".join(self._inverse[i] for i in ids if i not in (self.sot, self.eot) and i in self._inverse)
        words = text.split("</w>")
        raw = b" ".join(bytes(to_byte[c] for c in w if c in to_byte) for w in words)
        return raw.decode("utf-8", errors="replace").strip()

    def special_ids(self) -> list[int]:
        return [self.sot, self.eot] if self.vocab is not None else []

    def describe(self) -> dict[str, Any]:
        info = {"context_length": self.cfg.context_length, "pad_id": 0}
        if self.vocab is not None:
            info |= {"vocab_size": len(self.vocab), "eos_id": self.eot}
        return info

    @classmethod
    def describe_config(cls, cfg: ClipBPEConfig) -> dict[str, Any]:
        return {"context_length": cfg.context_length, "pad_id": 0}
