"""Token ids back to text (what captioning prints): the trained byte-level BPE and CLIP's BPE decode
what they encode, special tokens left out."""

from __future__ import annotations

import pytest

from coalign.data.transforms.clip_bpe import openclip_vocabulary
from coalign.registry import TRANSFORMS
from parts import world


def test_bpe_decodes_what_it_encodes():
    text = TRANSFORMS.create("bpe", **{**TRANSFORMS.tiny("bpe"), "context_length": 40})
    text.fit(world(["text"]), None)
    caption = "a tiny red circle, near the top"
    ids = text.encode([caption])[0].tolist()
    assert ids[0] == text.specials.bos and text.specials.eos in ids
    assert text.decode(ids) == caption  # the specials (and padding) left out
    assert text.decode(ids[1 : ids.index(text.specials.eos)]) == caption


def test_clip_bpe_decodes_what_it_encodes():
    pytest.importorskip("ftfy")
    vocabulary = openclip_vocabulary()
    if vocabulary is None:
        pytest.skip("open_clip's vocabulary file is not installed")
    text = TRANSFORMS.create("clip_bpe", path=str(vocabulary))
    ids = text.encode(["A big, red Circle near the top!"])[0].tolist()
    words = ids[1 : ids.index(text.specials.eos)]
    assert text.specials.bos == ids[0]
    assert text.decode(words) == "a big , red circle near the top !"  # CLIP's words, one space apart
    assert text.decode([text.specials.bos, *words, text.specials.eos]) == text.decode(words)
