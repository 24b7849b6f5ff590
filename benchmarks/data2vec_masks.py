"""Training throughput of the data2vec recipe with several masks per sample (data2vec 2.0), as JSON.

    python benchmarks/data2vec_masks.py [--masks 1 4] [--steps 10] [overrides ...]

Each run sets `objectives.1.num_masks` (the data2vec objective of recipes/data2vec.yaml). The
teacher encodes each sample once whatever M; the student trains on M masked copies. So two rates:
`samples_per_s` (full samples through the step, CLIP included) and `views_per_s` (masked copies the
student learns from, M per sample): with one mask per teacher pass (M = 1, data2vec 1's shape) the
views cost one teacher pass and one patch embedding each, with M they share them. The step is
`train_throughput.measure`'s (forward, backward, optimizer; the EMA update, the same for every M,
is not in it); precision fp32. Each rate is given per second of wall time and per second of the
process's CPU time (`_cpu_s`), the steadier one on shared cores with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json

import torch
from machine import describe  # noqa: I001  (benchmarks/ is run as a folder of scripts)
from train_throughput import measure

from coalign.config import load_recipe
from coalign.runtime import default_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="data2vec")
    parser.add_argument("--masks", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results = []
    for m in args.masks:
        recipe = load_recipe(args.recipe, [*args.overrides, f"objectives.1.num_masks={m}"])
        r = measure(recipe, args.precision, args.steps)
        for clock in ("s", "cpu_s"):
            r[f"views_per_{clock}"] = round(r[f"samples_per_{clock}"] * m, 1)
        results.append({"num_masks": m, **r})
    base = results[0]
    for r in results:  # relative to the first run (M = 1 by default), by each clock
        for rate in ("samples_per_s", "views_per_s", "samples_per_cpu_s", "views_per_cpu_s"):
            r[f"{rate}_ratio"] = round(r[rate] / base[rate], 2)
    print(
        json.dumps(
            {
                "benchmark": "data2vec_masks",
                "recipe": args.recipe,
                "overrides": args.overrides,
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
