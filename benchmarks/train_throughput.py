"""Training throughput of a recipe (default: demo) in fp32 and bf16, as JSON.

    python benchmarks/train_throughput.py [--recipe demo] [--steps 20] [--precision fp32 bf16]

Batches are built once from the recipe's real data pipeline and reused, so the figure is the
model + objective + optimizer step alone (data loading is measured separately by the loop's
samples/s in metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from machine import describe  # benchmarks/machine.py

from coalign.build import build_model, build_source, build_transforms, prepare_transforms
from coalign.config import load_recipe
from coalign.data.loader import BatchDataset
from coalign.data.transforms.base import Pipeline
from coalign.objectives.task import Task
from coalign.runtime import Runtime, default_device
from coalign.train.loop import forward_backward
from coalign.train.optim import build_optimizer


def measure(recipe, precision: str, steps: int, warmup: int = 3) -> dict:
    torch.manual_seed(0)
    runtime = Runtime(default_device(), precision)
    device = runtime.device
    source = build_source(recipe.data.train, "data.train")
    transforms = build_transforms(recipe)
    prepare_transforms(transforms, source, Path(tempfile.mkdtemp()), resume=False)
    data = BatchDataset(source, Pipeline(transforms), recipe.data.batch_size, recipe.seed)
    batches = [data[i] for i in range(4)]
    task = Task.from_specs(build_model(recipe, transforms), recipe.objectives, transforms).to(device).train()
    if recipe.train.compile:  # as the trainer does (train/session.py): in place, per tower
        for tower in task.model.towers.values():
            tower.compile(backend=recipe.train.compile_backend)
    opt = build_optimizer(task, recipe.train)
    samples = 0
    for i in range(warmup + steps):
        if i == warmup:
            start, cpu_start = time.perf_counter(), time.process_time()
            samples = 0
        batch = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        forward_backward(task, batch, 1, runtime)  # the trainer's step: padding cut, autocast, backward
        opt.step()
        samples += len(batch["id"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "precision": precision,
        "samples_per_s": round(samples / seconds, 1),
        "step_ms": round(1000 * seconds / steps, 1),
        # per second of this process's CPU time: on cores that other jobs share, steadier than the
        # wall clock (with one thread it is the compute alone; on a GPU it undercounts)
        "samples_per_cpu_s": round(samples / cpu_seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile: >= 4 batches)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    results = [measure(recipe, p, args.steps, args.warmup) for p in args.precision]
    print(
        json.dumps(
            {
                "benchmark": "train_throughput",
                "recipe": recipe.name,
                "batch_size": recipe.data.batch_size,
                "device": str(default_device()),
                "threads": torch.get_num_threads(),
                "machine": describe(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
