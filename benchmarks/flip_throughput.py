"""Training throughput with FLIP patch masking at several ratios, as JSON.

    python benchmarks/flip_throughput.py [--ratios 0 0.5 0.75] [--steps 20] [overrides ...]

Uses the demo recipe's model with `model.towers.image.mask_ratio` set per run; precision fp32
(see train_throughput.py for why bf16 is not the default on CPUs without AMX or AVX512_BF16).
"""

from __future__ import annotations

import argparse
import json

import torch
from train_throughput import measure  # noqa: I001  (benchmarks/ is run as a folder of scripts)

from coalign.config import load_recipe
from coalign.runtime import default_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results = []
    for ratio in args.ratios:
        recipe = load_recipe(args.recipe, [*args.overrides, f"model.towers.image.mask_ratio={ratio}"])
        results.append({"mask_ratio": ratio, **measure(recipe, args.precision, args.steps)})
    base = results[0]["samples_per_s"]
    for r in results:
        r["speedup"] = round(r["samples_per_s"] / base, 2)
    print(
        json.dumps(
            {
                "benchmark": "flip_throughput",
                "recipe": args.recipe,
                "device": str(default_device()),
                "threads": torch.get_num_threads(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
