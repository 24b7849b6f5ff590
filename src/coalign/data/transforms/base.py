"""The transform contract and the per-sample pipeline that applies one transform per modality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from coalign.data.sample import Sample, base_modality
from coalign.data.sources.base import Source


class Transform:
    """Turns one modality's raw value into a tensor: `transform(value, rng) -> tensor`.

    `rng` is a numpy Generator seeded from (seed, epoch, sample index), so augmentation is the same
    after a resume and in any worker. Failures raise `SampleError`. A transform that needs fitting on
    data (a tokenizer) does it in `fit`, saving what it learnt under `run_dir` so evaluation and
    serving load the same thing. `describe()` tells the encoder what shapes to expect.
    """

    train: bool = True
    # The kind of raw value it reads (a world modality: image, text, audio, points, tabular): the
    # registry tests draw raw values of it from the built-in world and pair it with that modality's
    # encoders.
    modality: str = ""
    # Options a view `<modality>@<view>` must share with its modality's transform: the view is encoded by
    # the same tower (image size) and reads the same learnt state (tokenizer).
    shared_with_views: tuple[str, ...] = ()

    def __call__(self, value: Any, rng: np.random.Generator) -> Any:
        raise NotImplementedError

    def fit(self, source: Source, run_dir: Path | None) -> None:
        """Learn from the training source (no-op by default)."""

    def load(self, run_dir: Path) -> None:
        """Load what `fit` saved (no-op by default)."""

    def save(self, run_dir: Path) -> None:
        """Write what `fit` learnt (or `load` read) into `run_dir` again, so a run folder made from
        another (`coalign interpolate`) reads the same inputs (no-op by default)."""

    def describe(self) -> dict[str, Any]:
        return {}

    @classmethod
    def describe_config(cls, cfg: Any) -> dict[str, Any]:
        """What `describe()` will say, from the validated Config alone, before any file or data is
        read: the recipe loader checks the encoders against it. Override when `describe()` depends
        on more than the config (a tokenizer read from a file)."""
        return cls(cfg).describe()

    def eval(self) -> Transform:
        """This transform without training-time randomness."""
        self.train = False
        return self


class Pipeline:
    """Applies `transforms[key]` to the raw value of `base_modality(key)`; other keys pass through.

    Several keys may read one modality (`image`, `image@v1`, `image@v2`): that is how intra-modal
    objectives (SLIP, TCL) get augmented views without any special case in the loader.
    """

    def __init__(self, transforms: dict[str, Transform], drop: dict[str, float] | None = None):
        self.transforms = transforms
        self.drop = {m: p for m, p in (drop or {}).items() if p > 0}

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        """Transform each key; with `drop[m] = p`, modality m (and its views) is left out of the
        sample with probability p, independently per modality, so training sees the missing
        modalities that evaluation may face (the draws come first from the sample's rng, so a run is
        still a function of its seed)."""
        dropped = {m for m, p in self.drop.items() if rng.random() < p}
        out = {k: v for k, v in sample.items() if k not in dropped}
        for key, transform in self.transforms.items():
            raw = None if base_modality(key) in dropped else sample.get(base_modality(key))
            if raw is not None:
                out[key] = transform(raw, rng)
            else:
                out.pop(key, None)
        return out

    def modalities(self) -> list[str]:
        return list(self.transforms)
