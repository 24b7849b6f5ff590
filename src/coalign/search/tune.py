"""Recall-targeted index choice: `coalign index OUT --recall 0.95 [--max-memory MB] [--max-build-seconds S]`.

1. Hold out `queries` rows of the data (never the index's own items while tuning: a stored vector
   finds itself and its graph neighbours, which would flatter HNSW) and compute their exact top-k
   over the other rows.
2. For every candidate that fits the memory budget (Flat, IVF-Flat, IVF-SQfp16, IVF-SQ8, IVF-PQ,
   IVF-PQ re-ranked on the original vectors, HNSW, HNSW-SQ8) build it over the other rows and sweep
   its search parameter (nprobe, efSearch; with re-ranking also k_factor) from cheap to costly; the
   first setting whose recall@k reaches the target (its lower 95 % confidence bound over the held-out
   queries, not only its mean: coalign.search.holdout) is timed (p50 / p99 single-query latency).
3. Keep the candidate with the lowest p50; rebuild it over every row (IVF: the trained quantizer,
   encoder and list assignments are reused, so this is only an add) with those parameters.

All IVF candidates share one coarse quantizer (k-means on a sample of the rows, never on all of
them) and one assignment of the rows to its lists, so each costs only its own encoder and add.
The rows may be a ShardRows (the memory-mapped float16 shards): every read is a sample, the held-out
queries, or a chunk of CHUNK rows, so only the index being built has to fit in memory.
A target no candidate reaches is refused with the best recall found. This file builds; the held-out
queries, recall, latency and the parameter sweep that judge each build are in coalign.search.holdout.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import faiss
import numpy as np
from tqdm import tqdm

from coalign.registry import ConfigError
from coalign.search import take_rows
from coalign.search.holdout import CHUNK, Holdout, Z, sweep
from coalign.search.index import HNSW_EF_CONSTRUCTION, HNSW_M, Rows, _pq_m, apply_search_params

KINDS = ("flat", "ivf-flat", "ivf-sqfp16", "ivf-sq8", "ivf-pq", "ivf-pq-refine", "hnsw", "hnsw-sq8")
HNSW_TRIAL = 5000  # rows of the trial build that predicts an HNSW build time


@dataclass
class Candidate:
    name: str
    factory: str
    memory_bytes: int  # estimated size in memory
    axis: str | None = None  # the swept search parameter: nprobe | efSearch | None (exact)
    values: list[int] = field(default_factory=list)  # its settings, cheapest first
    k_factors: tuple[int, ...] = (0,)  # re-ranking: candidates fetched per result (0: no re-ranking)

    def params(self, value: int | None, k_factor: int) -> str:
        parts = [f"{self.axis}={value}"] if self.axis else []
        return ",".join(parts + ([f"k_factor_rf={k_factor}"] if k_factor else []))


def ivf_nlist(n: int) -> int:
    """~4 sqrt(n) lists (faiss's guideline is 4-16 sqrt(n)), each with >= 39 training points."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def candidates(n: int, d: int) -> list[Candidate]:
    nlist = ivf_nlist(n)
    nbits = 8 if n >= 256 * 39 else max(1, min(8, int(math.log2(max(n // 39, 2)))))
    m = _pq_m(d, 8)
    pq = f"PQ{m}" + ("" if nbits == 8 else f"x{nbits}")
    lists = nlist * d * 4 + n * 8  # centroids + one id per item
    probes = sorted({min(nlist, 2**i) for i in range(int(math.log2(nlist)) + 2)})
    efs = [16, 32, 64, 128, 256, 512, 1024]
    graph = n * HNSW_M * 2 * 4  # level-0 links, int32
    ivf = dict(axis="nprobe", values=probes)
    return [
        Candidate("flat", "Flat", n * d * 4),
        Candidate("ivf-flat", f"IVF{nlist},Flat", lists + n * d * 4, **ivf),
        Candidate("ivf-sqfp16", f"IVF{nlist},SQfp16", lists + n * d * 2, **ivf),
        Candidate("ivf-sq8", f"IVF{nlist},SQ8", lists + n * d, **ivf),
        Candidate("ivf-pq", f"IVF{nlist},{pq}np", lists + n * m * nbits // 8, **ivf),
        Candidate(
            "ivf-pq-refine",
            f"IVF{nlist},{pq}np,RFlat",
            lists + n * (m * nbits // 8 + d * 4),
            k_factors=(2, 4, 8, 16),
            **ivf,
        ),
        Candidate("hnsw", f"HNSW{HNSW_M}", n * d * 4 + graph, axis="efSearch", values=efs),
        Candidate("hnsw-sq8", f"HNSW{HNSW_M},SQ8", n * d + graph, axis="efSearch", values=efs),
    ]


class SharedIVF:
    """The coarse quantizer of every IVF candidate: spherical k-means on a sample of the kept rows,
    then every row's list, computed once."""

    def __init__(self, x: Rows, kept: np.ndarray, nlist: int, seed: int, progress: bool):
        self.x, self.kept, self.nlist, self.seed, self.progress = x, kept, nlist, seed, progress
        self.centroids: np.ndarray | None = None

    def sample(self) -> np.ndarray:
        size = min(len(self.kept), max(40 * self.nlist, 40 * 256))  # 256: an 8-bit PQ's codebook
        rows = np.random.default_rng(self.seed).choice(self.kept, size=size, replace=False)
        return take_rows(self.x, np.sort(rows))

    def prepare(self) -> None:
        if self.centroids is not None:
            return
        t = time.perf_counter()
        d = self.x.shape[1]
        xs = self.sample()
        clus = faiss.Clustering(d, self.nlist)
        clus.niter, clus.seed, clus.spherical = 10, self.seed, True
        clus.verbose = False
        quantizer = faiss.IndexFlatIP(d)
        with tqdm(
            total=1, desc=f"k-means {self.nlist} lists on {len(xs)} rows", disable=not self.progress
        ) as bar:
            clus.train(xs, quantizer)
            bar.update()
        self.train_s = time.perf_counter() - t
        t = time.perf_counter()
        self.assign = np.empty(len(self.x), dtype=np.int64)
        for a in tqdm(range(0, len(self.x), CHUNK), desc="assign rows to lists", disable=not self.progress):
            self.assign[a : a + CHUNK] = quantizer.search(self.x[a : a + CHUNK], 1)[1][:, 0]
        self.assign_s = time.perf_counter() - t
        self.centroids = faiss.vector_to_array(clus.centroids).reshape(self.nlist, d)
        self.train_sample = xs


def add_rows(index: faiss.Index, x: Rows, rows: np.ndarray, assign, desc: str, progress: bool):
    """Add x[rows] in order, chunk by chunk; IVF indexes take the precomputed list of each row."""
    ivf = faiss.try_extract_index_ivf(index) if assign is not None else None
    refine = faiss.downcast_index(index)
    refine = refine if isinstance(refine, faiss.IndexRefine) else None
    for a in tqdm(range(0, len(rows), CHUNK), desc=desc, disable=not progress, leave=False):
        r = rows[a : a + CHUNK]
        xc = take_rows(x, r)
        if ivf is None:
            index.add(xc)
            continue
        lists = np.ascontiguousarray(assign[r])
        ivf.add_core(len(r), faiss.swig_ptr(xc), None, faiss.swig_ptr(lists))
        if refine is not None:
            refine.refine_index.add(xc)
            refine.ntotal = refine.refine_index.ntotal


def _hnsw_estimate(cand: Candidate, x: Rows, kept: np.ndarray) -> float:
    """Seconds to build `cand` over all kept rows, from a trial build on HNSW_TRIAL of them: the
    graph build costs about n log n."""
    m = min(len(kept), HNSW_TRIAL)
    trial = faiss.index_factory(x.shape[1], cand.factory, faiss.METRIC_INNER_PRODUCT)
    faiss.downcast_index(trial).hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    xs = take_rows(x, kept[:m])
    t = time.perf_counter()
    trial.train(xs)
    trial.add(xs)
    n = len(kept)
    return (time.perf_counter() - t) * (n / m) * math.log(max(n, 2)) / math.log(max(m, 2))


def _new_index(cand: Candidate, d: int) -> faiss.Index:
    index = faiss.index_factory(d, cand.factory, faiss.METRIC_INNER_PRODUCT)
    hnsw = faiss.downcast_index(index)
    if isinstance(hnsw, faiss.IndexHNSW):
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    return index


class Tuner:
    """Builds each candidate once over the kept rows and sweeps it for every target (the benchmark asks
    for several), then builds a chosen one over every row."""

    def __init__(
        self,
        x: Rows,
        max_memory_mb: float | None = None,
        max_build_seconds: float | None = None,
        queries: int = 1000,
        k: int = 10,
        kinds: tuple[str, ...] = KINDS,
        seed: int = 0,
        progress: bool = False,
    ):
        n = len(x)
        self.count = min(queries, max(1, n // 10))
        self.k = min(k, n - self.count)
        if n < 20 or self.k < 1:
            raise ConfigError(f"--recall needs at least 20 vectors to hold out queries from (got {n})")
        self.x, self.kinds, self.progress = x, kinds, progress
        self.max_memory_mb, self.max_build_seconds = max_memory_mb, max_build_seconds
        self.hold = Holdout(x, self.count, self.k, seed)
        self.shared = SharedIVF(x, self.hold.kept, ivf_nlist(len(self.hold.kept)), seed, progress)
        self.blobs: dict[str, bytes] = {}

    def run(self, targets: list[float]) -> dict[float, list[dict]]:
        """{target: the candidate table}; a row's status: reaches target | below target | over memory |
        over build time."""
        x, hold, shared = self.x, self.hold, self.shared
        n, d = x.shape
        budget = math.inf if self.max_memory_mb is None else self.max_memory_mb * 2**20
        tables: dict[float, list[dict]] = {t: [] for t in targets}
        started = time.perf_counter()
        for cand in candidates(len(hold.kept), d):
            if cand.name not in self.kinds:
                continue
            memory = cand.memory_bytes * n / len(hold.kept)  # over every row, as the final index holds
            row = {"name": cand.name, "factory": cand.factory, "memory_mb": round(memory / 2**20, 2)}
            rows = {t: dict(row) for t in targets}  # one row per target's table
            for t in targets:
                tables[t].append(rows[t])
            status = self._skip(cand, memory, budget)
            if status is not None:
                for r in rows.values():
                    r.update(status)
                continue
            index = _new_index(cand, d)
            t = time.perf_counter()
            ivf = faiss.try_extract_index_ivf(index)
            if ivf is not None:
                shared.prepare()
                ivf.quantizer.add(shared.centroids)  # a full quantizer is not trained again
                t = time.perf_counter() - shared.train_s - shared.assign_s  # count the shared work in
            if not index.is_trained:
                index.train(shared.train_sample if ivf is not None else shared.sample())
            self.blobs[cand.name] = faiss.serialize_index(
                index
            )  # trained, empty: the final build starts here
            assign = shared.assign if ivf is not None else None
            add_rows(index, x, hold.kept, assign, f"add {cand.name}", self.progress)
            build_s = time.perf_counter() - t  # compared unrounded: a tiny build rounds to 0.0
            over = self.max_build_seconds is not None and build_s > self.max_build_seconds
            found = {} if over else sweep(index, cand, hold, targets)
            for target, r in rows.items():
                r["build_s"] = round(build_s, 2)
                r.update(found.get(target, {"status": "over build time"}))
            del index
        self.tuning_s = time.perf_counter() - started
        return tables

    def _skip(self, cand: Candidate, memory: float, budget: float) -> dict | None:
        if memory > budget:
            return {"status": "over memory"}
        if self.max_build_seconds is not None and cand.axis == "efSearch":
            estimate = _hnsw_estimate(cand, self.x, self.hold.kept)
            if estimate > self.max_build_seconds:
                return {"status": "over build time", "build_s_estimate": round(estimate, 1)}
        return None

    def choose(self, table: list[dict], target: float) -> dict:
        """The fastest row reaching `target` (marked chosen), or the refusal naming the best recall."""
        ok = [r for r in table if r.get("status") == "reaches target"]
        if not ok:
            limits = (self.max_memory_mb, self.max_build_seconds)
            raise ConfigError(impossible_message(table, target, self.k, self.count, *limits))
        chosen = min(ok, key=lambda r: (r["p50_ms"], r["memory_mb"]))
        chosen["status"] = "chosen"
        return chosen

    def final(self, chosen: dict) -> tuple[faiss.Index, float]:
        """The chosen candidate over every row (its trained state reused), parameters applied; seconds."""
        t = time.perf_counter()
        index = faiss.deserialize_index(self.blobs[chosen["name"]])
        ivf = faiss.try_extract_index_ivf(index)
        assign = self.shared.assign if ivf is not None else None
        add_rows(index, self.x, np.arange(len(self.x)), assign, f"final {chosen['name']}", self.progress)
        apply_search_params(index, chosen["params"])
        return index, time.perf_counter() - t

    def report(self, table: list[dict], chosen: dict, target: float, final_s: float) -> dict:
        shared = self.shared
        return {
            "type": chosen["name"],
            "factory": chosen["factory"],
            "search_params": chosen["params"],
            f"recall@{self.k}": chosen["recall"],
            "recall_bound": chosen["recall_bound"],  # mean - Z * std / sqrt(queries), what met the target
            "recall_bound_z": Z,
            "target_recall": target,
            "held_out_queries": self.count,
            "p50_ms": chosen["p50_ms"],
            "p99_ms": chosen["p99_ms"],
            "final_add_s": round(final_s, 2),
            "tuning_s": round(self.tuning_s + final_s, 2),
            "ivf": None
            if shared.centroids is None
            else {"nlist": shared.nlist, "train_rows": len(shared.train_sample)},
            "candidates": table,
        }


def tune(
    x: Rows,
    target: float,
    max_memory_mb: float | None = None,
    max_build_seconds: float | None = None,
    queries: int = 1000,
    k: int = 10,
    kinds: tuple[str, ...] = KINDS,
    seed: int = 0,
    progress: bool = False,
) -> tuple[faiss.Index, dict]:
    """The fastest index over x (float32 normalised rows, in memory or a ShardRows) whose recall@k on
    held-out rows reaches
    `target`, built over every row with its search parameters applied, and the tuning table."""
    check_target(target, max_memory_mb, max_build_seconds, kinds)
    tuner = Tuner(x, max_memory_mb, max_build_seconds, queries, k, kinds, seed, progress)
    table = tuner.run([target])[target]
    chosen = tuner.choose(table, target)
    index, final_s = tuner.final(chosen)
    return index, tuner.report(table, chosen, target, final_s)


def check_target(target, max_memory_mb, max_build_seconds, kinds) -> None:
    if not (isinstance(target, int | float) and 0 < target <= 1):
        raise ConfigError(f"--recall must be a number in (0, 1], e.g. 0.95 (got {target})")
    if max_memory_mb is not None and max_memory_mb <= 0:
        raise ConfigError(f"--max-memory must be a positive number of MB (got {max_memory_mb})")
    if max_build_seconds is not None and max_build_seconds <= 0:
        raise ConfigError(f"--max-build-seconds must be positive (got {max_build_seconds})")
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise ConfigError(f"unknown index kinds {unknown}; valid: {', '.join(KINDS)}")


def impossible_message(table, target, k, count, max_memory_mb, max_build_seconds) -> str:
    tried = [r for r in table if "best_recall" in r]
    limits = [f"--max-memory {max_memory_mb:g} MB"] if max_memory_mb is not None else []
    limits += [f"--max-build-seconds {max_build_seconds:g}"] if max_build_seconds is not None else []
    within = f" within {' and '.join(limits)}" if limits else ""
    if not tried:
        return f"no index fits{within} (tried {', '.join(r['name'] for r in table)}); raise the limits"
    best = max(tried, key=lambda r: (r["best_bound"], r["best_recall"]))
    return (
        f"no index reaches recall@{k} {target:g}{within} on {count} held-out queries: the best recall "
        f"found is {best['best_recall']:.4f} ({best['name']}, {best['best_params'] or 'exact'}), whose "
        f"lower 95 % bound {best['best_bound']:.4f} is what must reach the target; "
        f"lower --recall or raise the limits"
    )


def table_lines(report: dict) -> list[str]:
    """The candidates as printed by `coalign index --recall`."""
    head = ("candidate", "MB", "build s", "params", "recall", "bound", "p50 ms", "p99 ms")
    lines = ["  {:<14} {:>9} {:>8} {:<22} {:>7} {:>7} {:>8} {:>8}  status".format(*head)]
    show = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    for r in report["candidates"]:
        recall = r.get("recall", r.get("best_recall"))
        bound = r.get("recall_bound", r.get("best_bound"))
        lines.append(
            f"  {r['name']:<14} {r['memory_mb']:>9.1f} {r.get('build_s', float('nan')):>8.1f} "
            f"{r.get('params', r.get('best_params', '')) or '-':<22} "
            f"{show(recall):>7} {show(bound):>7} {r.get('p50_ms', float('nan')):>8.3f} "
            f"{r.get('p99_ms', float('nan')):>8.3f}  {r['status']}"
            + (" (stopped gaining)" if r.get("plateau") else "")
        )
    return lines
