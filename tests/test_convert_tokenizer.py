"""`clip_bpe` gives `open_clip.tokenize`'s ids, read from the vocabulary file open_clip ships."""

import glob
import random

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("ftfy")

from coalign.data.transforms.clip_bpe import ClipBPETransform, read_vocabulary, write_vocabulary  # noqa: E402
from coalign.registry import TRANSFORMS  # noqa: E402

VOCAB = glob.glob(f"{open_clip.__path__[0]}/*.txt.gz")[0]

BLOCKS = [  # code point ranges to draw characters from: scripts, symbols, emoji, marks, spaces
    (0x20, 0x7E),
    (0xA0, 0x24F),
    (0x370, 0x3FF),
    (0x400, 0x4FF),
    (0x590, 0x6FF),
    (0x900, 0x97F),
    (0x300, 0x36F),
    (0x3040, 0x30FF),
    (0x4E00, 0x4FFF),
    (0xAC00, 0xAD00),
    (0x2000, 0x206F),
    (0x20A0, 0x20CF),
    (0x2190, 0x22FF),
    (0x1F300, 0x1F64F),
    (0x1F900, 0x1F9FF),
    (0xFF00, 0xFFEF),
]
FIXED = [
    "",
    " ",
    "\t\n\r ",
    "a photo of a cat.",
    "A PHOTO OF A DOG!!!",
    "it's I'LL we'd they've you're",
    "&amp; &lt;b&gt; &#39;quoted&#39; &amp;amp;",
    "naïve café déjà vu",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "👩‍👩‍👧‍👦 family 🏳️‍🌈 flag 👍🏽",
    "数字 123 ١٢٣ ۴۵۶",
    "<start_of_text> inside <end_of_text> text",
    "mojibake: SchÃ¶ne GrÃ¼ÃŸe",
    "tabs\tand\nnew\u2028lines\u00a0nbsp",
    "....,,,;;;:::!!!???",
    "word " * 200,
    "x" * 500,
    "12345678901234567890",
    "e\u0301 combining",
    "ǅungla ΣΊΣΥΦΟΣ straße",
]


def varied_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(FIXED)
    for _ in range(n):
        words = []
        for _ in range(rng.randint(0, 30)):
            lo, hi = rng.choice(BLOCKS)
            words.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8))))
        out.append(rng.choice([" ", "  ", "\t", "", " \n "]).join(words))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return TRANSFORMS.create("clip_bpe", path=VOCAB)


def test_ids_equal_open_clip_on_varied_text(tokenizer):
    texts = varied_strings(1500)
    ours, theirs = tokenizer.encode(texts), open_clip.tokenize(texts)
    bad = [t for t, a, b in zip(texts, ours, theirs, strict=True) if not torch.equal(a, b)]
    assert not bad, f"{len(bad)} of {len(texts)} differ, e.g. {bad[:3]!r}"
    assert (theirs[:, -1] != 0).sum() > 10  # the set holds captions cut at the context length


@pytest.mark.parametrize("length", [5, 16, 77])
def test_context_lengths(tokenizer, length):
    short = TRANSFORMS.create("clip_bpe", path=VOCAB, context_length=length)
    texts = varied_strings(100, seed=length)
    assert torch.equal(short.encode(texts), open_clip.tokenize(texts, context_length=length))


def test_vocabulary_round_trips_through_a_hugging_face_folder(tokenizer, tmp_path):
    vocab, merges = read_vocabulary(VOCAB)
    assert len(vocab) == 49408 and len(merges) == 48894
    write_vocabulary(vocab, merges, tmp_path)
    again = ClipBPETransform()
    again.load(tmp_path)
    texts = varied_strings(100, seed=7)
    assert torch.equal(again.encode(texts), tokenizer.encode(texts))
    assert again.describe() == {"context_length": 77, "pad_id": 0, "vocab_size": 49408, "eos_id": 49407}


def test_missing_vocabulary_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        ClipBPETransform(path=str(tmp_path))
    with pytest.raises(ValueError, match="needs `path`"):
        ClipBPETransform().fit(None, tmp_path)
