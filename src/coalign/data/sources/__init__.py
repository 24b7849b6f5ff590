"""Data sources: one file per format; each registers itself in `coalign.registry.SOURCES`."""

from coalign.data.sample import Sample
from coalign.data.sources.base import SampleError, SkipCounter, Source, ZeroShotTask

__all__ = ["Sample", "SampleError", "SkipCounter", "Source", "ZeroShotTask"]
