"""The special tokens of any `tokenizer.json`: which id pads, which starts and which ends a caption.

coalign's own tokenizers use `<pad>, <bos>, <eos>` at ids 0-2. A pretrained tokenizer has its own:
BERT's `[PAD]` (0), `[CLS]` (101) and `[SEP]` (102); RoBERTa's `<pad>`, `<s>`, `</s>`; CLIP's
`<|endoftext|>` padding. They are read from the file itself, in this order:

1. names the recipe gives (`pad_token`, `bos_token`, `eos_token` of the text transform);
2. the file's padding (`padding.pad_token`) and its post-processor, whose template for a single
   sequence puts the start token before the text and the end token after it
   (`TemplateProcessing`, `BertProcessing`, `RobertaProcessing`);
3. well-known names present in the vocabulary.

A tokenizer with no padding token is refused (padding is how a tower tells real tokens from the
rest); one without start or end tokens writes none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tokenizers import Tokenizer

KNOWN = {
    "pad": ["<pad>", "[PAD]", "<|pad|>", "<|endoftext|>"],
    "bos": ["<bos>", "[CLS]", "<s>", "<|startoftext|>"],
    "eos": ["<eos>", "[SEP]", "</s>", "<|endoftext|>"],
}


@dataclass(frozen=True)
class Specials:
    pad: int
    bos: int | None
    eos: int | None

    def ids(self) -> list[int]:
        return [i for i in (self.pad, self.bos, self.eos) if i is not None]


def _template(processor: dict) -> tuple[str | None, str | None]:
    """(start, end) token names of a post-processor's single-sequence template, where it has one."""
    kind = processor.get("type")
    if kind in ("BertProcessing", "RobertaProcessing"):
        return processor["cls"][0], processor["sep"][0]
    if kind == "TemplateProcessing":
        items = processor.get("single", [])
        at = next((i for i, item in enumerate(items) if "Sequence" in item), None)
        if at is None:
            return None, None
        before = [item["SpecialToken"]["id"] for item in items[:at] if "SpecialToken" in item]
        after = [item["SpecialToken"]["id"] for item in items[at + 1 :] if "SpecialToken" in item]
        return (before[-1] if before else None), (after[0] if after else None)
    if kind == "Sequence":  # several processors (byte-level offsets, then a template)
        for sub in processor.get("processors", []):
            found = _template(sub)
            if found != (None, None):
                return found
    return None, None


def find_specials(tok: Tokenizer, names: tuple[str | None, str | None, str | None], where: str) -> Specials:
    """The pad, start and end ids of `tok` (see the module docstring); `names` are the recipe's."""
    padding = (tok.padding or {}).get("pad_token")
    start, end = _template(json.loads(tok.to_str()).get("post_processor") or {})
    found: dict[str, int | None] = {}
    for role, given, from_file in zip(("pad", "bos", "eos"), names, (padding, start, end), strict=True):
        if given is not None:
            if tok.token_to_id(given) is None:
                raise ValueError(f"tokenizer '{where}' has no token {given!r} ({role}_token)")
            found[role] = tok.token_to_id(given)
            continue
        candidates = [from_file] if from_file is not None else KNOWN[role]
        found[role] = next((tok.token_to_id(c) for c in candidates if tok.token_to_id(c) is not None), None)
    if found["pad"] is None:
        raise ValueError(
            f"tokenizer '{where}' has no padding token (none of {KNOWN['pad']}, and its file names none); "
            "name it with data.transforms.text.pad_token"
        )
    return Specials(found["pad"], found["bos"], found["eos"])
