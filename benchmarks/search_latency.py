"""Search latency and recall of the index types `coalign index` chooses between, as JSON.

    python benchmarks/search_latency.py [--sizes 100000 1000000] [--dim 512] [--queries 200]
                                        [--types flat hnsw ivfpq] [--data random|clustered]

For each size: build time, single-query latency (p50 / p99 over `--queries` queries, one at a time),
batch throughput, and recall@10 against exact (Flat) search. The indexes are built and tuned by
coalign.search.index, exactly as `coalign index` does. `random` (uniform on the sphere) is the
hardest case for approximate search: every point is about equally far from every other. Real
embeddings cluster and have an effective dimension far below their width; `clustered` imitates
that: points around 1000 centres, spread in a 64-dimensional subspace.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import faiss
import numpy as np

from coalign.search.index import HNSW_M, apply_search_params, build, ivfpq_choice, search_params


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--types", nargs="+", default=["flat", "hnsw", "ivfpq"], choices=["flat", "hnsw", "ivfpq"])
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
        "faiss": faiss.__version__,
        "threads": faiss.omp_get_max_threads(),
        "cpu": platform.processor(),
        "data": args.data,
        "queries": args.queries,
    }
    print(json.dumps({"environment": env, "results": results}, indent=2))


if __name__ == "__main__":
    main()
