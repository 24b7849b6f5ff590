"""Embedding throughput of a trained run on the built-in world, as JSON.

    python benchmarks/embed_throughput.py RUN [--size 2000] [--batch-size 256] [--device cpu]

`model`: items/s of the image and text towers alone, on inputs transformed beforehand.
`end_to_end`: items/s of `coalign embed` (world rendering, transforms, both towers, float16 shards,
metadata, thumbnails, atomic writes) over the same samples.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from coalign.build import build_source, load_run
from coalign.config import SourceSpec
from coalign.runtime import Runtime
from coalign.search.embed import embed_source


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def tower_rate(model, modality: str, x: torch.Tensor, batch_size: int, device: torch.device) -> float:
    model.encode(modality, x[:batch_size].to(device))  # warm-up (kernel selection, allocations)
    sync(device)
    t = time.perf_counter()
    for i in range(0, len(x), batch_size):
        model.encode(modality, x[i : i + batch_size].to(device))
    sync(device)
    return len(x) / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="run folder or checkpoint folder")
    p.add_argument("--size", type=int, default=2000, help="world samples to embed")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    run = load_run(args.run, Runtime(device, "fp32"))
    spec = {"source": "world", "split": "test", "size": args.size}
    source = build_source(SourceSpec(**spec), "world")
    rng = np.random.default_rng(0)
    samples = [source[i] for i in range(args.size)]
    images = torch.stack([run.transforms["image"](s["image"], rng) for s in samples])
    texts = run.transforms["text"].encode([s["text"] for s in samples])
    model = {
        "image_items_per_s": round(tower_rate(run.model, "image", images, args.batch_size, device), 1),
        "text_items_per_s": round(tower_rate(run.model, "text", texts, args.batch_size, device), 1),
    }
    with tempfile.TemporaryDirectory() as tmp:
        summary = embed_source(
            args.run, spec, Path(tmp) / "out", batch_size=args.batch_size, progress=False, device=args.device
        )
    end_to_end = {
        "items_per_s": round(summary["rows"] / summary["seconds"], 1),
        "seconds": summary["seconds"],
        "note": "includes loading the run, rendering the world, both towers and all writes",
    }
    env = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor(),
        "checkpoint": str(run.checkpoint),
        "embed_dim": run.model.embed_dim,
        "items": args.size,
        "batch_size": args.batch_size,
    }
    print(json.dumps({"environment": env, "model": model, "end_to_end": end_to_end}, indent=2))


if __name__ == "__main__":
    main()
