"""Deterministic, resumable batches.

The order of samples is a fixed function of (seed, step): epoch e visits the source in the
order `source.epoch_order(seed, e)` (a uniform permutation drawn from (seed, e), unless the source
orders its samples for locality, as tar shards do), and batch `step` covers global positions
[step * B, (step + 1) * B) of that endless sequence. Resuming at step s therefore yields exactly
the batches an uninterrupted run would have seen, whatever the number of workers, and each
sample's augmentation randomness is seeded from (seed, epoch, index) for the same reason.

Workers build whole batches (the dataset below is indexed by step), so skip counts travel inside
each batch (as plain dicts, see collate.py) and are merged in the main process.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from coalign.data.collate import collate
from coalign.data.sources.base import SampleError, SkipCounter, Source
from coalign.data.transforms.base import Pipeline


def load_sample(
    source: Source, pipeline: Pipeline, index: int, rng: np.random.Generator, skipped: SkipCounter
):
    """One transformed sample, or None (counted in `skipped`, with its index) if it is unusable."""
    try:
        return pipeline(source[index], rng)
    except SampleError as err:
        skipped.skip(err.reason, index)
        return None


class BatchDataset(torch.utils.data.Dataset):
    """Item `step` is the collated training batch for that step: with `shard=(rank, world)`, this
    rank's contiguous slice of the global batch of `batch_size` samples. The slices of all ranks, in
    rank order, are exactly the single-process batch, so the order does not depend on the world size
    (resume is exact at any world size that divides the batch)."""

    def __init__(
        self, source: Source, pipeline: Pipeline, batch_size: int, seed: int, shard: tuple[int, int] = (0, 1)
    ):
        if len(source) == 0:
            raise ValueError("the training source is empty")
        rank, world = shard
        if batch_size % world or not 0 <= rank < world:
            raise ValueError(
                f"a global batch of {batch_size} does not split into {world} ranks (rank {rank})"
            )
        self.source, self.pipeline, self.batch_size, self.seed = source, pipeline, batch_size, seed
        self.rank, self.world = rank, world

    def __len__(self) -> int:  # endless in principle; the loop stops at its step budget
        return 2**62

    def positions(self, step: int) -> list[tuple[int, int]]:
        """(epoch, index) of each sample in batch `step`."""
        n = len(self.source)
        share = self.batch_size // self.world
        first = step * self.batch_size + self.rank * share
        out = []
        for pos in range(first, first + share):
            epoch, offset = divmod(pos, n)
            out.append((epoch, int(self.source.epoch_order(self.seed, epoch)[offset])))
        return out

    def __getitem__(self, step: int) -> dict[str, Any]:
        skipped = SkipCounter()
        samples = []
        for epoch, index in self.positions(step):
            rng = np.random.default_rng([self.seed, epoch, index])
            sample = load_sample(self.source, self.pipeline, index, rng, skipped)
            if sample is not None:
                samples.append(sample)
        return collate(samples, self.pipeline.modalities(), skipped)


def train_batches(
    source: Source,
    pipeline: Pipeline,
    batch_size: int,
    seed: int,
    start_step: int,
    num_workers: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[dict[str, Any]]:
    """Batches for steps start_step, start_step + 1, ... (endless); this rank's slice with `shard`."""
    dataset = BatchDataset(source, pipeline, batch_size, seed, shard)
    steps = range(start_step, len(dataset))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        sampler=steps,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
        # its own generator: a DataLoader iterator otherwise draws its base seed from torch's global
        # RNG when it starts, i.e. after a resume restored that RNG, and every later draw of an
        # objective (ITM negatives, MLM masks) would differ from the uninterrupted run's
        generator=torch.Generator().manual_seed(seed),
    )
    yield from loader


def eval_samples(source: Source, pipeline: Pipeline, max_samples: int | None, skipped: SkipCounter):
    """(index, transformed sample) for the first `max_samples` usable samples of an evaluation source."""
    rng = np.random.default_rng(0)
    limit = len(source) if max_samples is None else min(len(source), max_samples)
    for index in range(limit):
        sample = load_sample(source, pipeline, index, rng, skipped)
        if sample is not None:
            yield index, sample
