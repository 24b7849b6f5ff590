"""The transform contract and the per-sample pipeline that applies one transform per modality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from coalign.data.sources.base import Sample, Source


class Transform:
    """Turns one modality's raw value into a tensor: `transform(value, rng) -> tensor`.

    `rng` is a numpy Generator seeded from (seed, epoch, sample index), so augmentation is the same
    after a resume and in any worker. Failures raise `SampleError`. A transform that needs fitting on
    data (a tokenizer) does it in `fit`, saving what it learnt under `run_dir` so evaluation and
    serving load the same thing. `describe()` tells the encoder what shapes to expect.
    """

    train: bool = True

    def __call__(self, value: Any, rng: np.random.Generator) -> Any:
        raise NotImplementedError

    def fit(self, source: Source, run_dir: Path | None) -> None:
        """Learn from the training source (no-op by default)."""

    def load(self, run_dir: Path) -> None:
        """Load what `fit` saved (no-op by default)."""

    def describe(self) -> dict[str, Any]:
        return {}

    def eval(self) -> Transform:
        """This transform without training-time randomness."""
        self.train = False
        return self


class Pipeline:
    """Applies `transforms[modality]` to each modality present in a sample; other keys pass through."""

    def __init__(self, transforms: dict[str, Transform]):
        self.transforms = transforms

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        out = dict(sample)
        for modality, transform in self.transforms.items():
            if sample.get(modality) is not None:
                out[modality] = transform(sample[modality], rng)
            else:
                out.pop(modality, None)
        return out

    def modalities(self) -> list[str]:
        return list(self.transforms)
