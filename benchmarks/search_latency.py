"""Search latency and recall of the indexes `coalign index` builds, as JSON.

    python benchmarks/search_latency.py [--sizes 100000 1000000] [--dim 512] [--queries 200]
                                        [--targets 0.9 0.95 0.99] [--max-build-seconds 600]
                                        [--types flat hnsw ivfpq] [--data random|clustered]

With --targets (the default): per size and target recall, the index `coalign index --recall T` chooses
(coalign.search.tune: every candidate built once, swept per target on held-out rows), then measured
on fresh queries that are not in the data: build time (the tuning of every candidate, and the
chosen candidate's own build), memory (its file size), single-query latency (p50 / p99, one query at
a time), batch throughput and recall@10 against exact search. With --types instead: the fixed rule of
`coalign index` without --recall, one line per type. `random` (uniform on the sphere) is the
hardest case for approximate search: every point is about equally far from every other. Real
embeddings cluster and have an effective dimension far below their width; `clustered` imitates
that: points around 1000 centres, spread in a 64-dimensional subspace.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import faiss
import numpy as np
from machine import describe  # benchmarks/machine.py

from coalign.search.index import HNSW_M, apply_search_params, build, ivfpq_choice, search_params
from coalign.search.tune import KINDS, Tuner, table_lines

# The columns of each candidate row kept in the JSON.
ROW_KEYS = (
    "name",
    "status",
    "build_s",
    "params",
    "recall",
    "recall_bound",
    "best_recall",
    "best_bound",
    "p50_ms",
)


def vectors(
    n: int, d: int, kind: str, rng: np.random.Generator, centres: np.ndarray, basis: np.ndarray
) -> np.ndarray:
    """(n, d) float32 on the unit sphere, made in chunks so that 1M x 512 needs no float64 copy."""
    out = np.empty((n, d), dtype=np.float32)
    for i in range(0, n, 100_000):
        m = min(100_000, n - i)
        if kind == "clustered":  # a centre plus noise in a 64-d subspace
            noise = rng.standard_normal((m, len(basis)), dtype=np.float32) @ basis / np.sqrt(len(basis))
            x = centres[rng.integers(0, len(centres), m)] + 0.5 * noise
        else:
            x = rng.standard_normal((m, d), dtype=np.float32)
        out[i : i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def factory_for(kind: str, n: int, d: int) -> str:
    return {"flat": "Flat", "hnsw": f"HNSW{HNSW_M}", "ivfpq": ivfpq_choice(n, d, float("inf")).factory}[kind]


def measure(index: faiss.Index, queries: np.ndarray, truth: np.ndarray | None, k: int) -> dict:
    latencies = []
    for i in range(len(queries)):
        t = time.perf_counter()
        index.search(queries[i : i + 1], k)
        latencies.append(time.perf_counter() - t)
    t = time.perf_counter()
    _, ids = index.search(queries, k)
    batch = time.perf_counter() - t
    ms = 1000 * np.array(latencies)
    out = {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "batch_qps": round(len(queries) / batch, 1),
    }
    if truth is not None:
        out[f"recall@{k}"] = round(
            float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, truth, strict=True)])), 4
        )
    return out, ids


def file_mb(index: faiss.Index) -> float:
    """The index's size on disk, about its size in memory (one write to a temporary file)."""
    with tempfile.NamedTemporaryFile(suffix=".faiss") as f:
        faiss.write_index(index, f.name)
        return round(os.path.getsize(f.name) / 2**20, 1)


def tuned(x: np.ndarray, q: np.ndarray, truth: np.ndarray, n: int, args) -> list[dict]:
    t = time.perf_counter()
    tuner = Tuner(
        x, None, args.max_build_seconds, args.tune_queries, args.k, tuple(args.candidates), progress=True
    )
    tables = tuner.run(args.targets)
    tuning_s = time.perf_counter() - t
    out = []
    for target in args.targets:
        table = tables[target]
        try:
            chosen = tuner.choose(table, target)
        except Exception as err:  # an impossible target: recorded, not fatal
            out.append({"n": n, "target": target, "refused": str(err)})
            print(json.dumps(out[-1]), flush=True)
            continue
        index, final_s = tuner.final(chosen)
        figures, _ = measure(index, q, truth, args.k)
        out.append(
            {
                "n": n,
                "dim": args.dim,
                "data": args.data,
                "target": target,
                "type": chosen["name"],
                "factory": chosen["factory"],
                "search_params": chosen["params"],
                "tuning_recall": chosen["recall"],
                "tuning_recall_bound": chosen["recall_bound"],
                "build_s": round(tuning_s + final_s, 1),  # every candidate tuned + the final index
                "chosen_build_s": round(chosen["build_s"] + final_s, 1),  # this index alone, tuned
                "memory_mb": file_mb(index),
                **figures,
                "candidates": [{k: r.get(k) for k in ROW_KEYS} for r in table],
            }
        )
        print("\n".join(table_lines({"candidates": table})), file=sys.stderr, flush=True)
        print(json.dumps(out[-1]), flush=True)
        del index
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--types", nargs="+", choices=["flat", "hnsw", "ivfpq"], help="the fixed rule's types")
    p.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    p.add_argument("--max-build-seconds", type=float, help="per candidate, as `coalign index`")
    p.add_argument("--candidates", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--tune-queries", type=int, default=1000, help="held-out rows the tuner uses")
    p.add_argument("--data", default="random", choices=["random", "clustered"])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, help="faiss OpenMP threads (default: all cores)")
    args = p.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, args.dim), dtype=np.float32) / np.sqrt(args.dim)
    basis = np.linalg.qr(rng.standard_normal((args.dim, 64)))[0].T.astype(np.float32)  # (64, d) orthonormal
    results = []
    for n in args.sizes:
        x = vectors(n, args.dim, args.data, rng, centres, basis)
        q = vectors(args.queries, args.dim, args.data, rng, centres, basis)  # held out: not in the index
        # Exact ground truth, computed once per size with the Flat index.
        exact = faiss.IndexFlatIP(args.dim)
        exact.add(x)
        _, truth = exact.search(q, args.k)
        del exact
        if not args.types:
            results += tuned(x, q, truth, n, args)
            continue
        for kind in args.types:
            factory = factory_for(kind, n, args.dim)
            t = time.perf_counter()
            index = build(x, factory)
            build_s = time.perf_counter() - t
            params = search_params(index)
            apply_search_params(index, params)
            figures, _ = measure(index, q, truth, args.k)
            results.append(
                {
                    "n": n,
                    "dim": args.dim,
                    "type": kind,
                    "factory": factory,
                    "search_params": params,
                    "build_s": round(build_s, 2),
                    **figures,
                }
            )
            print(json.dumps(results[-1]), flush=True)
            del index
    env = {
        "targets": args.targets,
        "max_build_seconds": args.max_build_seconds,
        "faiss": faiss.__version__,
        "threads": faiss.omp_get_max_threads(),
        "machine": describe(),
        "data": args.data,
        "queries": args.queries,
    }
    print(json.dumps({"environment": env, "results": results}, indent=2))


if __name__ == "__main__":
    main()
