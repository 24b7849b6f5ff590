"""Weak scaling (1 -> N processes, the same batch per process) and torch.compile on/off, as JSON.

    python benchmarks/scaling.py weak [--nproc 1 2] [--per-rank 32] [--steps 12]
    python benchmarks/scaling.py compile [--per-rank 32] [--steps 12]

Each setting is a real `coalign train demo --smoke` run (torchrun for N > 1, gloo on the CPU) with
evaluation off; samples/s is the global batch times the steps after the first `--skip` ones,
divided by the rank-0 loop time between them (from metrics.jsonl's elapsed_s), so start-up, data
warm-up and compilation are left out. On a CPU the processes share the machine's cores: weak
scaling there measures the overhead of the gather and the all-reduce, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import describe  # benchmarks/machine.py

BASE = ["data.train.size=2048", "eval.evaluators=[]", "train.precision=fp32", "train.log_every=1"]


def run(nproc: int, per_rank: int, steps: int, skip: int, extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp()) / "run"
    batch = per_rank * nproc
    cmd = [sys.executable, "-m", "coalign", "train", "demo", *BASE, f"data.batch_size={batch}"]
    cmd += [f"train.steps={steps}", f"train.checkpoint_every={steps}", *extra]
    cmd += ["--smoke", "--no-progress", "--out", str(out), "--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("kind") == "train" and "elapsed_s" in r]
    first, last = rows[skip - 1], rows[-1]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    measured = last["step"] - first["step"]
    return {
        "nproc": nproc,
        "global_batch": batch,
        "extra": extra,
        "steps_measured": int(measured),
        "samples_per_s": round(batch * measured / seconds, 1),
        "step_ms": round(1000 * seconds / measured, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["weak", "compile"])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--per-rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="first steps left out (warm-up)")
    args = parser.parse_args()
    if args.what == "weak":
        results = [run(n, args.per_rank, args.steps, args.skip, []) for n in args.nproc]
    else:
        results = [
            run(1, args.per_rank, args.steps, args.skip, [f"train.compile={c}"]) for c in ("false", "true")
        ]
    print(
        json.dumps(
            {
                "benchmark": f"scaling_{args.what}",
                "recipe": "demo --smoke",
                "per_rank_batch": args.per_rank,
                "threads_per_process": int(os.environ.get("OMP_NUM_THREADS", "1")),
                "cpus": os.cpu_count(),
                "machine": describe(),
                "note": "one short run per setting on a shared machine; on the CPU the processes share "
                "the cores, so weak scaling shows communication overhead, not speed-up",
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
