"""The rules of `coalign data filter` (`data/filter.py`): their options, checked before any work,
and the per-sample caption and image checks. The rule names, in the order they are applied, are
`RULES`; `data/filter.py`'s docstring says what each one removes."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

RULES = (
    "unreadable",
    "caption_too_short",
    "caption_too_long",
    "repeated_words",
    "few_letters",
    "wrong_script",
    "repeated_caption",
    "image_too_small",
    "extreme_aspect",
    "exact_duplicate",
    "near_duplicate",
    "low_score",
)
WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Rules:
    """What `filter_source` removes; None turns a rule off."""

    min_words: int = 1
    max_words: int | None = None
    min_chars: int = 1
    max_chars: int | None = None
    max_repeat: float | None = None  # fraction of a caption's words that repeat an earlier one
    min_letters: float | None = None  # fraction of a caption's characters that are letters
    script: str | None = None  # LATIN, CYRILLIC, GREEK, CJK, ...: at least script_fraction of the letters
    script_fraction: float = 0.9
    max_caption_count: int | None = None  # a caption carried by more samples than this is boilerplate
    min_image_side: int | None = None
    max_aspect: float | None = None
    exact_duplicates: bool = True
    near_duplicates: float | None = None  # cosine of image embeddings; needs a model
    threshold: float | None = None  # the pair's cosine; needs a model
    keep_fraction: float | None = None  # keep this best fraction by score; needs a model

    def check(self, has_model: bool) -> None:
        """One-line ValueError naming the option and its valid range, before any work."""
        for name in (
            "min_words",
            "min_chars",
            "max_words",
            "max_chars",
            "max_caption_count",
            "min_image_side",
        ):
            value = getattr(self, name)
            if value is not None and value < (0 if name.startswith("min") else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
        for low, high in (("min_words", "max_words"), ("min_chars", "max_chars")):
            if getattr(self, high) is not None and getattr(self, high) < getattr(self, low):
                raise ValueError(f"--{high.replace('_', '-')} is below --{low.replace('_', '-')}")
        for name, lo, hi in (
            ("max_repeat", 0.0, 1.0),
            ("min_letters", 0.0, 1.0),
            ("script_fraction", 0.0, 1.0),
            ("near_duplicates", -1.0, 1.0),
            ("threshold", -1.0, 1.0),
        ):
            value = getattr(self, name)
            if value is not None and not lo <= value <= hi:
                raise ValueError(f"--{name.replace('_', '-')} must be in [{lo:g}, {hi:g}], not {value}")
        if self.keep_fraction is not None and not 0 < self.keep_fraction <= 1:
            raise ValueError(f"--keep-fraction must be in (0, 1], not {self.keep_fraction}")
        if self.max_aspect is not None and self.max_aspect < 1:
            raise ValueError(
                f"--max-aspect (longer side / shorter side) must be at least 1, not {self.max_aspect}"
            )
        if self.threshold is not None and self.keep_fraction is not None:
            raise ValueError("give --threshold or --keep-fraction, not both")
        needs = [n for n in ("threshold", "keep_fraction", "near_duplicates") if getattr(self, n) is not None]
        if needs and not has_model:
            names = ", ".join("--" + n.replace("_", "-") for n in needs)
            raise ValueError(
                f"{names} need --model RUN (a trained run whose image and text towers embed the pairs)"
            )

    @property
    def embeds(self) -> bool:
        return (
            self.threshold is not None or self.keep_fraction is not None or self.near_duplicates is not None
        )


def caption_rule(text: str, rules: Rules) -> str | None:
    """The caption rule `text` fails first, or None."""
    words = WORD.findall(text.lower())
    if len(words) < rules.min_words or len(text) < rules.min_chars:
        return "caption_too_short"
    if (rules.max_words is not None and len(words) > rules.max_words) or (
        rules.max_chars is not None and len(text) > rules.max_chars
    ):
        return "caption_too_long"
    if (
        rules.max_repeat is not None
        and len(words) >= 4
        and 1 - len(set(words)) / len(words) > rules.max_repeat
    ):
        return "repeated_words"
    letters = [c for c in text if c.isalpha()]
    if rules.min_letters is not None and len(letters) < rules.min_letters * len(text.replace(" ", "")):
        return "few_letters"
    if rules.script is not None:
        script = rules.script.upper()
        inside = sum(unicodedata.name(c, "").startswith(script) for c in letters)
        if not letters or inside < rules.script_fraction * len(letters):
            return "wrong_script"
    return None


def image_rule(width: int, height: int, rules: Rules) -> str | None:
    if rules.min_image_side is not None and min(width, height) < rules.min_image_side:
        return "image_too_small"
    if rules.max_aspect is not None and max(width, height) > rules.max_aspect * min(width, height):
        return "extreme_aspect"
    return None
