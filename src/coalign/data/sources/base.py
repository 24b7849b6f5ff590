"""What every source shares: samples are dicts; a bad sample raises `SampleError` and is skipped."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coalign.data.sample import Sample, captions


class SampleError(Exception):
    """A sample that cannot be used (corrupt image, empty caption, missing file).

    `reason` is a short, stable key ("corrupt_image", "empty_caption", ...) under which the skip
    is counted and reported at the end of a run.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def check_split(value: str, splits) -> str:
    """A source's `split` option: one of `splits`, else the message every source gives."""
    if value not in splits:
        raise ValueError(f"split '{value}' is not valid; valid splits: {', '.join(splits)}")
    return value


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
        """Captions for fitting a tokenizer (first `limit` samples; unreadable ones are passed over),
        as `sample.captions` gives them: blank ones left out, lone surrogates replaced."""
        out: list[str] = []
        for i in range(min(len(self), limit or len(self))):
            try:
                text = self[i].get("text")
            except SampleError:
                continue
            out.extend(captions(text))
        return out

    def zero_shot_tasks(self) -> dict[str, ZeroShotTask]:
        return {}

    def epoch_order(self, seed: int, epoch: int) -> Sequence[int]:
        """The indices training visits in `epoch`, in order: len(self) of them, a pure function of
        (seed, epoch) (that is what makes resume exact, see `data/loader.py`). Default: a uniform
        permutation. A source that reads from files where locality matters (tar shards) orders its
        samples so that consecutive positions read nearby data."""
        return _permutation(seed, epoch, len(self))

    @classmethod
    def example(cls, folder: Path) -> dict[str, Any]:
        """Options that read a few samples in this source's format, after writing them under `folder`:
        the registry tests run every source on them (with its Config's tiny settings). A source that
        reads no files (the built-in world) needs none: {}."""
        return {}


# (class name, RGB) of the images that file sources write for `Source.example`
EXAMPLE_COLOURS = [("red", (220, 30, 30)), ("green", (30, 180, 40)), ("blue", (30, 70, 230))]


def write_example_images(folder: Path, count: int = 6, classes: bool = False) -> list[tuple[str, str, int]]:
    """`count` small PNGs of plain colours under `folder` (in one subfolder per colour with
    `classes`): [(path relative to folder, caption, class index)], for `Source.example`."""
    import numpy as np
    from PIL import Image

    rows = []
    for i in range(count):
        label = i % len(EXAMPLE_COLOURS)
        colour, rgb = EXAMPLE_COLOURS[label]
        rel = Path(colour if classes else ".") / f"image{i}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        pixels = np.broadcast_to(np.array(rgb, dtype=np.uint8), (16, 16, 3))
        Image.fromarray(np.ascontiguousarray(pixels)).save(folder / rel)
        rows.append((rel.as_posix(), f"a {colour} square, number {i}", label))
    return rows


class ZeroShotTask:
    """Classify `sample["label"][key]` into `classnames` by prompting with `templates`."""

    def __init__(self, key: str, classnames: list[str], templates: list[str]):
        if not classnames or not templates:
            raise ValueError(f"zero-shot task '{key}' needs class names and templates")
        self.key = key
        self.classnames = classnames
        self.templates = templates


class SkipCounter(Counter):
    """Counts skipped samples by reason, and keeps the source index of the first `ROWS_KEPT` of each.

    It is a Counter (`skipped[reason] += 1`, `update`, `dict(skipped)` are the counts); `skip(reason,
    row)` also keeps the row, and `update` with another SkipCounter merges its rows. A batch carries
    plain dicts instead (`as_batch`), because torch's DataLoader rebuilds every mapping of a batch as
    `copy(m).update(items)`, which adds a Counter's counts to themselves; `from_batch` reads them back.
    `record()` / `from_record` are the JSON form that reports and checkpoints store.
    """

    ROWS_KEPT = 20

    def __init__(self, counts: Mapping[str, int] | Iterable[str] = (), rows: Mapping | None = None):
        self.rows: dict[str, list[int]] = {}  # before Counter's __init__, which calls update()
        super().__init__(counts)
        self.add_rows(rows or {})

    def __reduce__(self):  # copy and pickle keep the rows (Counter's own keeps only the counts)
        return self.__class__, (dict(self), self.rows)

    def skip(self, reason: str, row: int | None = None) -> None:
        """Count one sample skipped for `reason`; `row` is its index in the source."""
        self[reason] += 1
        if row is not None:
            self.add_rows({reason: [row]})

    def add_rows(self, rows: Mapping[str, Iterable[int]]) -> None:
        """Keep these rows (source indices, by reason) up to ROWS_KEPT per reason; counts unchanged."""
        for reason, more in rows.items():
            kept = self.rows.setdefault(reason, [])
            kept.extend(int(r) for r in list(more)[: max(0, self.ROWS_KEPT - len(kept))])

    def update(self, other: Any = (), /, **kwargs: int) -> None:
        super().update(other, **kwargs)
        if isinstance(other, SkipCounter):
            self.add_rows(other.rows)

    def as_batch(self) -> dict[str, dict]:
        """The plain dicts a batch carries: {"skipped": {reason: n}, "skipped_rows": {reason: [row]}}."""
        return {"skipped": dict(self), "skipped_rows": {k: list(v) for k, v in self.rows.items()}}

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any]) -> SkipCounter:
        return cls(batch.get("skipped") or {}, batch.get("skipped_rows"))

    def record(self) -> dict[str, dict]:
        """JSON-ready: {"counts": {reason: n}, "rows": {reason: [source index, ...]}}."""
        return {
            "counts": dict(sorted(self.items())),
            "rows": {k: list(v) for k, v in sorted(self.rows.items())},
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SkipCounter:
        return cls(record.get("counts") or {}, record.get("rows"))

    def report(self) -> str:
        if not self:
            return "no samples skipped"
        return "skipped " + ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(self.items()))
