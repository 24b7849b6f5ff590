"""What every source shares: samples are dicts; a bad sample raises `SampleError` and is skipped."""

from __future__ import annotations

from collections import Counter
from typing import Any

Sample = dict[str, Any]


class SampleError(Exception):
    """A sample that cannot be used (corrupt image, empty caption, missing file).

    `reason` is a short, stable key ("corrupt_image", "empty_caption", ...) under which the skip
    is counted and reported at the end of a run.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Source:
    """A map-style collection of raw samples: `len(src)`, `src[i] -> dict`.

    Raw means undecoded: an image may be a path, bytes or an array; a caption may be a string or a
    list of strings. Decoding happens in transforms, where failures become `SampleError`s.
    Sources that know how to classify their samples expose `zero_shot_tasks()`.
    """

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:
        raise NotImplementedError

    def captions(self, limit: int | None = None) -> list[str]:
        """Captions for fitting a tokenizer (first `limit` samples; unreadable ones are passed over)."""
        out: list[str] = []
        for i in range(min(len(self), limit or len(self))):
            try:
                text = self[i].get("text")
            except SampleError:
                continue
            out.extend([text] if isinstance(text, str) else list(text or []))
        return out

    def zero_shot_tasks(self) -> dict[str, ZeroShotTask]:
        return {}


class ZeroShotTask:
    """Classify `sample["label"][key]` into `classnames` by prompting with `templates`."""

    def __init__(self, key: str, classnames: list[str], templates: list[str]):
        if not classnames or not templates:
            raise ValueError(f"zero-shot task '{key}' needs class names and templates")
        self.key = key
        self.classnames = classnames
        self.templates = templates


class SkipCounter(Counter):
    """Counts skipped samples by reason; merged across batches and workers, reported at the end."""

    def report(self) -> str:
        if not self:
            return "no samples skipped"
        return "skipped " + ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(self.items()))
