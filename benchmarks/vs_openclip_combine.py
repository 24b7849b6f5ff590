"""Combine `vs_openclip.py` JSON files of one dataset, seed by seed, into one report (mean, spread, ratios).

    python benchmarks/vs_openclip_combine.py --dataset scenes OLD.json vs-scenes-coalign-3.json ...

Each input is a report of `vs_openclip.py` (per side its `runs`, one per seed) or a summary of
earlier seeds (per side `seeds`, `mean`, `std`: the acceptance file kept only those; a combined
report holds both datasets, `--dataset` picks one). Summaries enter through their sufficient
statistics (n, sum, sum of squares from the mean and the sample standard deviation), so the result is
the mean and sample standard deviation over every seed, as `vs_openclip.py` computes them over runs.
A seed that two inputs both hold for the same side is refused. `SIDE=FILE` (`coalign=old.json`) takes
only that side of a file: to set one side's earlier seeds against the other side run again with
changed settings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_openclip import SIDES, flat  # noqa: E402 (one flattening of a run for both scripts)


class Pool:
    """Per metric: count, sum and sum of squares over seeds."""

    def __init__(self) -> None:
        self.seeds: list[int] = []
        self.stats: dict[str, list[float]] = {}

    def add_seeds(self, seeds: list[int], where: str) -> None:
        again = sorted(set(seeds) & set(self.seeds))
        if again:
            raise SystemExit(f"{where}: seed(s) {again} already counted from another file")
        self.seeds += seeds

    def add(self, key: str, n: int, total: float, squares: float) -> None:
        s = self.stats.setdefault(key, [0, 0.0, 0.0])
        s[0] += n
        s[1] += total
        s[2] += squares

    def summary(self) -> dict:
        mean, std = {}, {}
        for key, (n, total, squares) in self.stats.items():
            if n != len(self.seeds):
                continue  # a metric that not every input reports
            m = total / n
            mean[key] = round(m, 4)
            std[key] = round(math.sqrt(max(squares - n * m * m, 0.0) / (n - 1)), 4) if n > 1 else 0.0
        return {"seeds": sorted(self.seeds), "mean": mean, "std": std}


def take(pools: dict[str, Pool], report: dict, where: str, only: str | None = None) -> None:
    for side, block in report.get("sides", {}).items():
        if only is not None and side != only:
            continue
        pool = pools.setdefault(side, Pool())
        if "runs" in block:
            pool.add_seeds([r["seed"] for r in block["runs"]], where)
            for run in block["runs"]:
                for key, v in flat(run).items():
                    pool.add(key, 1, v, v * v)
        else:  # a summary: n seeds, their mean and sample standard deviation
            n = len(block["seeds"])
            pool.add_seeds(list(block["seeds"]), where)
            for key, m in block["mean"].items():
                s = block["std"].get(key, 0.0)
                pool.add(key, n, n * m, (n - 1) * s * s + n * m * m)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="reports; SIDE=FILE takes only that side of one")
    p.add_argument("--dataset", required=True, help="the dataset to combine (scenes, world)")
    a = p.parse_args(argv)
    pools: dict[str, Pool] = {}
    for arg in a.files:
        only, sep, rest = arg.partition("=")
        only, path = (only, Path(rest)) if sep and only in SIDES else (None, Path(arg))
        report = json.loads(path.read_text())
        if "sides" not in report:  # a combined file of several datasets
            if a.dataset not in report:
                raise SystemExit(f"{path}: no dataset '{a.dataset}'; it holds {sorted(report)}")
            report = report[a.dataset]
        elif report.get("dataset", a.dataset) != a.dataset:
            raise SystemExit(f"{path}: dataset '{report['dataset']}', not '{a.dataset}'")
        if only is not None and only not in report.get("sides", {}):
            raise SystemExit(f"{path}: no side '{only}'; it holds {sorted(report.get('sides', {}))}")
        take(pools, report, str(path), only)
    out: dict = {"benchmark": "vs_openclip", "dataset": a.dataset, "files": list(a.files)}
    out["sides"] = {side: pool.summary() for side, pool in pools.items()}
    if all(s in out["sides"] for s in SIDES):
        c, o = (out["sides"][s]["mean"] for s in SIDES)
        out["ratios"] = {k: round(c[k] / o[k], 4) if o.get(k) else None for k in c if k in o}
        out["coalign_at_least_openclip"] = {
            k.split("/", 1)[1]: c[k] >= o[k] for k in c if k.startswith("zero_shot/") and k in o
        }
    json.dump(out, sys.stdout, indent=2)
    print()
    return out


if __name__ == "__main__":
    main()
