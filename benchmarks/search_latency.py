"""Search latency and recall of the indexes `coalign index` builds, as JSON.

    python benchmarks/search_latency.py [--sizes 100000 1000000] [--dim 512] [--queries 200]
                                        [--targets 0.9 0.95 0.99] [--max-build-seconds 600]
                                        [--types flat hnsw ivfpq] [--data random|clustered]
                                        [--max-memory MB] [--disk DIR]

With --targets (the default): per size and target recall, the index `coalign index --recall T` chooses
(coalign.search.tune: every candidate built once, swept per target on held-out rows), then measured
on fresh queries that are not in the data: build time (the tuning of every candidate, and the
chosen candidate's own build), memory (its file size), single-query latency (p50 / p99, one query at
a time), batch throughput and recall@10 against exact search. With --types instead: the fixed rule of
`coalign index` without --recall, one line per type. `random` (uniform on the sphere) is the
hardest case for approximate search: every point is about equally far from every other. Real
embeddings cluster and have an effective dimension far below their width; `clustered` imitates
that: points around 1000 centres, spread in a 64-dimensional subspace.

With --disk DIR the vectors never sit in memory all at once: each size is generated in chunks into
float16 shards, DIR/<data>-<n>x<dim>/embeddings/image/shard_XXXXX.npy with a manifest.json, as
`coalign embed` writes them (a folder left by an earlier run with the same size, width and data is
reused; any other content there is refused), and the tuner, the exact ground truth and the index
builds read them memory-mapped through coalign.search.ShardRows, the path `coalign index` takes. A
10M x 512 set is 10 GB of shards; the index (IVF-SQ8: 5 GB) is what must fit in memory. Data and
queries depend only on (size, dim, data), so a --disk run measures the same vectors as one without
(rounded to float16).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from machine import describe  # benchmarks/machine.py

from coalign.search import open_embeddings, read_manifest, shard_path, write_manifest
from coalign.search.index import HNSW_M, apply_search_params, build, ivfpq_choice, search_params
from coalign.search.tune import KINDS, Tuner, table_lines

STEP = 100_000  # rows generated at a time
SHARD = 1_000_000  # rows per float16 shard with --disk (1 GB at 512-d)

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
    "plateau",
    "p50_ms",
)


def chunks(n: int, d: int, kind: str, rng: np.random.Generator, centres: np.ndarray, basis: np.ndarray):
    """(<= STEP, d) float32 chunks of n points on the unit sphere, no float64 copy."""
    for i in range(0, n, STEP):
        m = min(STEP, n - i)
        if kind == "clustered":  # a centre plus noise in a 64-d subspace
            noise = rng.standard_normal((m, len(basis)), dtype=np.float32) @ basis / np.sqrt(len(basis))
            x = centres[rng.integers(0, len(centres), m)] + 0.5 * noise
        else:
            x = rng.standard_normal((m, d), dtype=np.float32)
        yield x / np.linalg.norm(x, axis=1, keepdims=True)


def vectors(n: int, d: int, kind: str, rng, centres, basis) -> np.ndarray:
    """(n, d) float32 on the unit sphere, in memory."""
    out = np.empty((n, d), dtype=np.float32)
    for i, x in enumerate(chunks(n, d, kind, rng, centres, basis)):
        out[i * STEP : i * STEP + len(x)] = x
    return out


def on_disk(root: Path, n: int, d: int, kind: str, rng, centres, basis):
    """The ShardRows of n generated points in float16 shards under root (made once, then reused)."""
    out = root / f"{kind}-{n}x{d}"
    spec = {"generator": "benchmarks/search_latency.py", "data": kind, "n": n, "dim": d}
    manifest = read_manifest(out)
    if manifest is not None and manifest.get("finished") and manifest.get("benchmark") == spec:
        print(f"reusing {out}", file=sys.stderr, flush=True)
        return open_embeddings(out, manifest, "image")
    if out.exists() and any(out.iterdir()):
        sys.exit(
            f"--disk: '{out}' holds other files than this benchmark's {spec}; remove them or pick another DIR"
        )
    shards, made = [], chunks(n, d, kind, rng, centres, basis)
    for shard, a in enumerate(range(0, n, SHARD)):
        m = min(SHARD, n - a)
        path = shard_path(out, "image", shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(m, d))
        for i in range(0, m, STEP):  # SHARD is a multiple of STEP: chunks never straddle two shards
            array[i : i + STEP] = next(made)
        array.flush()
        del array
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        shards.append({"shard": shard, "rows": m})
        print(f"wrote {path} ({a + m} of {n} rows)", file=sys.stderr, flush=True)
    manifest = {"modalities": ["image"], "embed_dim": d, "finished": True, "num_shards": len(shards)}
    write_manifest(out, {**manifest, "shards": shards, "benchmark": spec})
    return open_embeddings(out, read_manifest(out), "image")


def exact_ids(x, q: np.ndarray, k: int) -> np.ndarray:
    """(nq, k) rows of the exact top-k inner products, x scanned in chunks (in memory or memory-mapped)."""
    heap = faiss.ResultHeap(len(q), k, keep_max=True)
    for a in range(0, len(x), STEP):
        scores, ids = faiss.knn(
            q, np.ascontiguousarray(x[a : a + STEP]), k, metric=faiss.METRIC_INNER_PRODUCT
        )
        heap.add_result(scores, np.where(ids >= 0, ids + a, -1))
    heap.finalize()
    return heap.I


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


def file_mb(index: faiss.Index, folder: str | None = None) -> float:
    """The index's size on disk, about its size in memory (one write to a temporary file in folder)."""
    with tempfile.NamedTemporaryFile(suffix=".faiss", dir=folder) as f:
        faiss.write_index(index, f.name)
        return round(os.path.getsize(f.name) / 2**20, 1)


def tuned(x, q: np.ndarray, truth: np.ndarray, n: int, args) -> list[dict]:
    t = time.perf_counter()
    budgets = (args.max_memory, args.max_build_seconds)
    tuner = Tuner(x, *budgets, args.tune_queries, args.k, tuple(args.candidates), progress=True)
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
                "memory_mb": file_mb(index, args.disk),
                **figures,
                "candidates": [{k: r.get(k) for k in ROW_KEYS} for r in table],
            }
        )
        print("\n".join(table_lines({"candidates": table})), file=sys.stderr, flush=True)
        print(json.dumps(out[-1]), flush=True)
        del index
    return out


def main(argv: list[str] | None = None) -> dict:
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
    p.add_argument("--max-memory", type=float, metavar="MB", help="the tuner's memory budget per index")
    p.add_argument("--disk", metavar="DIR", help="generate float16 shards under DIR and build from them")
    args = p.parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    if args.disk:
        Path(args.disk).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, args.dim), dtype=np.float32) / np.sqrt(args.dim)
    basis = np.linalg.qr(rng.standard_normal((args.dim, 64)))[0].T.astype(np.float32)  # (64, d) orthonormal
    results = []
    for n in args.sizes:
        make = (args.dim, args.data, np.random.default_rng([0, n]), centres, basis)
        x = on_disk(Path(args.disk), n, *make) if args.disk else vectors(n, *make)
        q_make = (args.dim, args.data, np.random.default_rng([1, n]), centres, basis)
        q = vectors(args.queries, *q_make)  # held out: not in the index
        truth = exact_ids(x, q, args.k)  # exact ground truth, once per size
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
        "max_memory_mb": args.max_memory,
        "disk": args.disk,
    }
    report = {"environment": env, "results": results}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
