"""Decode + transform throughput from WebDataset shards vs from a CSV of the same images, as JSON.

    python benchmarks/shard_throughput.py [--samples 2000] [--image-size 128] [--workers 1 2]

Renders `--samples` world images as JPEG files with a CSV manifest, packs that CSV into shards
with `coalign.data.pack`, then times the training loader (`train_batches`: read, decode, the demo
recipe's image and text transforms, collate) over each source for each worker count. The shards
hold the same JPEG bytes, so the difference is reading one file per sample vs seeking in a tar.
Decoding dominates both on a local disk; shards pay off where opening many small files is slow
(network file systems, cold caches), which this benchmark on a warm local page cache does not show.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from coalign.build import build_transforms, prepare_transforms
from coalign.config import load_recipe
from coalign.data.loader import train_batches
from coalign.data.pack import pack
from coalign.data.sources.csv import CSVSource
from coalign.data.sources.webdataset import WebDatasetSource
from coalign.data.transforms.base import Pipeline
from coalign.registry import SOURCES


def write_csv(folder: Path, samples: int, image_size: int) -> Path:
    world = SOURCES.create("world", size=samples, image_size=image_size, cache=False)
    rows = [("filepath", "title")]
    for i in range(samples):
        sample = world[i]
        name = f"img{i:06d}.jpg"
        Image.fromarray(sample["image"]).save(folder / name, quality=90)
        rows.append((name, sample["text"]))
    with open(folder / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return folder / "manifest.csv"


def measure(source, pipeline: Pipeline, batch_size: int, workers: int, batches: int) -> dict:
    it = train_batches(source, pipeline, batch_size, seed=0, start_step=0, num_workers=workers)
    next(it)  # workers started, first shard indexes read
    started = time.perf_counter()
    samples = sum(len(next(it)["id"]) for _ in range(batches))
    seconds = time.perf_counter() - started
    del it
    return {"workers": workers, "samples": samples, "samples_per_s": round(samples / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each is kept")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "files").mkdir()
        manifest = write_csv(root / "files", args.samples, args.image_size)
        from_csv = CSVSource(path=str(manifest))
        pack(from_csv, root / "shards", shard_size=args.shard_size, progress=False)
        from_shards = WebDatasetSource(path=str(root / "shards"))
        transforms = build_transforms(load_recipe("demo"), views=False)
        (root / "run").mkdir()
        prepare_transforms(transforms, from_csv, root / "run", resume=False)
        pipeline = Pipeline(transforms)
        batches = max(1, args.samples // args.batch_size - 1)  # about one epoch after the first batch
        # Rounds alternate the sources so that a busy machine slows both alike; best of the rounds.
        best: dict[tuple[str, int], dict] = {}
        for _ in range(args.rounds):
            for name, src in (("shards", from_shards), ("csv", from_csv)):
                for w in args.workers:
                    r = measure(src, pipeline, args.batch_size, w, batches)
                    if r["samples_per_s"] > best.get((name, w), {"samples_per_s": 0})["samples_per_s"]:
                        best[(name, w)] = r
        results = {name: [best[(name, w)] for w in args.workers] for name in ("shards", "csv")}
    print(
        json.dumps(
            {
                "benchmark": "shard_throughput",
                "samples": args.samples,
                "image_size": args.image_size,
                "batch_size": args.batch_size,
                "shard_size": args.shard_size,
                "rounds": args.rounds,
                "transforms": {k: type(t).__name__ for k, t in transforms.items()},
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
