"""`coalign index`: build one FAISS index per embedded modality, chosen by size and memory budget.

Vectors are L2-normalised and compared by inner product (cosine similarity). The rule, unless a
FAISS factory string is given:

  Flat     exact search, n * d * 4 bytes          if n <= flat_max_n and it fits the budget
  HNSW32   graph, n * (d * 4 + 32 * 2 * 4) bytes  if n <= hnsw_max_n and it fits the budget
  IVF-PQ   inverted lists of PQ codes             otherwise: nlist ~ 4 sqrt(n), m = d / 8 sub-quantisers
                                                  (d / 16, d / 32 if the budget is tight), trained on a sample

Flat stops at 200k items because exact search costs ~0.13 s per query there (512-d, 2 CPU cores:
65 ms at 100k, 0.46 s at 1M; benchmarks/search_latency.py); HNSW stops at 2M because its build takes
hours on a laptop beyond that, and its graph costs 256 bytes per item on top of the vectors.
Every index is checked: recall@10 against exact search, on stored vectors used as queries.

The rows are read from the memory-mapped float16 shards (`ShardRows`) in bounded chunks, never all at
once: a training sample, then the adds and the exact ground truth chunk by chunk. So the embeddings
need not fit in memory to be indexed (only the index itself must), and `build`, `recall_at_k` and the
tuner take either a ShardRows or an in-memory float32 array, with the same results.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from coalign.io import atomic_write_text
from coalign.registry import ConfigError
from coalign.search import (
    ShardRows,
    finished_manifest,
    index_path,
    open_embeddings,
    take_rows,
    write_metadata_arrow,
)
from coalign.search.shards import SHARDS, part_ranges, shard_dir, write_layout

REPORT = "report.json"
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80  # faiss's default 40 loses several points of recall on 512-d embeddings
HNSW_EF_SEARCH = 128
ADD_CHUNK = 65_536  # rows per add: a bounded float32 copy (128 MB at 512-d) and a progress bar's step
Rows = np.ndarray | ShardRows  # (n, d) float32 normalised rows, in memory or memory-mapped


@dataclass
class IndexRule:
    """Thresholds of the index choice (parameters so tests can force each type on small data)."""

    flat_max_n: int = 200_000
    hnsw_max_n: int = 2_000_000


@dataclass
class Choice:
    kind: str  # flat | hnsw | ivfpq | factory
    factory: str
    memory_bytes: int  # estimate of the index in memory


def _pq_m(d: int, dims_per_code: int) -> int:
    """The largest number of sub-quantisers that divides d and gives each >= dims_per_code dimensions."""
    return max(m for m in range(1, d + 1) if d % m == 0 and d // m >= dims_per_code)


def ivfpq_choice(n: int, d: int, budget: float) -> Choice:
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list
    nbits = 8 if n >= 256 * 39 else max(1, min(8, int(math.log2(max(n // 39, 2)))))
    for dims in (8, 16, 32):  # shorter codes only when the budget forces them
        m = _pq_m(d, dims)
        memory = n * (m * nbits // 8 + 8) + nlist * d * 4 + (2**nbits) * d * 4
        if memory <= budget:
            break
    bits = "" if nbits == 8 else f"x{nbits}"
    # "np": skip polysemous training (only Hamming-filtered search uses it; it makes training 20x slower)
    return Choice("ivfpq", f"IVF{nlist},PQ{m}{bits}np", memory)


def choose_index(n: int, d: int, max_memory_mb: float | None = None, rule: IndexRule | None = None) -> Choice:
    rule = rule or IndexRule()
    budget = math.inf if max_memory_mb is None else max_memory_mb * 2**20
    flat = n * d * 4
    if n <= rule.flat_max_n and flat <= budget:
        return Choice("flat", "Flat", flat)
    hnsw = n * (d * 4 + HNSW_M * 2 * 4)
    if n <= rule.hnsw_max_n and hnsw <= budget:
        return Choice("hnsw", f"HNSW{HNSW_M}", hnsw)
    return ivfpq_choice(n, d, budget)


def search_params(index: faiss.Index) -> str:
    """The query-time settings for `index` (a faiss ParameterSpace string; query.py applies the same)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return f"nprobe={min(ivf.nlist, max(8, ivf.nlist // 16))}"
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return f"efSearch={HNSW_EF_SEARCH}"
    return ""


def apply_search_params(index: faiss.Index, params: str) -> None:
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)


def build(x: Rows, factory: str, seed: int = 0, progress: bool = False) -> faiss.Index:
    """A trained, filled inner-product index over the rows of x (float32, normalised), trained on a
    sample and filled chunk by chunk."""
    from tqdm import tqdm

    n, d = x.shape
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ConfigError(f"--factory '{factory}' is not a valid FAISS index_factory string: {err}") from None
    hnsw = faiss.downcast_index(index)
    if isinstance(hnsw, faiss.IndexHNSW):
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        wanted = max(64 * (ivf.nlist if ivf is not None else 1), 256 * 64)
        sample = np.random.default_rng(seed).permutation(n)[: min(n, wanted)]
        index.train(take_rows(x, np.sort(sample)))
    for a in tqdm(range(0, n, ADD_CHUNK), desc=f"add {factory}", disable=not progress, leave=False):
        index.add(np.ascontiguousarray(x[a : a + ADD_CHUNK]))
    return index


def exact_topk_scores(x: Rows, q: np.ndarray, k: int, chunk: int | None = None) -> np.ndarray:
    """(nq, k) the k best inner products of each query over x, best first, in row chunks."""
    chunk = chunk or ADD_CHUNK
    best = np.full((len(q), 0), -np.inf, dtype=np.float32)
    for i in range(0, len(x), chunk):
        s = np.concatenate([best, q @ x[i : i + chunk].T], axis=1)
        best = -np.partition(-s, min(k, s.shape[1]) - 1, axis=1)[:, :k]
    return -np.sort(-best, axis=1)


def recall_at_k(index: faiss.Index, x: Rows, queries: np.ndarray, k: int) -> float:
    """Share of returned results as good as the exact k-th result. Scored by similarity, not by id,
    so that equal vectors (repeated captions) in another order do not count as misses."""
    q = take_rows(x, queries)
    _, ids = index.search(q, k)
    kth = exact_topk_scores(x, q, k)[:, -1]
    valid = ids >= 0
    found = take_rows(x, np.where(valid, ids, 0).ravel()).reshape(*ids.shape, -1)  # (nq, k, d)
    scores = np.einsum("qd,qkd->qk", q, found)
    hits = valid & (scores >= kth[:, None] - 1e-5)
    return float(hits.sum() / hits.size)


def write_index_atomic(index: faiss.Index, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_index(
    out_dir: str | Path,
    max_memory_mb: float | None = None,
    factory: str | None = None,
    sample_queries: int = 1000,
    rule: IndexRule | None = None,
    modalities: list[str] | None = None,
    seed: int = 0,
    target_recall: float | None = None,
    max_build_seconds: float | None = None,
    kinds: tuple[str, ...] | None = None,
    progress: bool = False,
    mmap: bool = False,
    shards: int | None = None,
) -> dict[str, Any]:
    """Build OUT/index/<modality>.faiss for each embedded modality and write OUT/index/report.json.
    With `target_recall`, the index is the fastest one that reaches it (coalign.search.tune)."""
    out = Path(out_dir)
    manifest = finished_manifest(out)
    if max_memory_mb is not None and max_memory_mb <= 0:
        raise ConfigError(f"--max-memory must be a positive number of MB (got {max_memory_mb})")
    if target_recall is not None:
        from coalign.search.tune import KINDS, check_target

        if factory:
            raise ConfigError("give --recall or --factory, not both: --recall chooses the factory")
        kinds = tuple(kinds or KINDS)
        check_target(target_recall, max_memory_mb, max_build_seconds, kinds)
    if shards is not None and (not isinstance(shards, int) or shards < 1):
        raise ConfigError(f"--shards must be a positive number of parts, got {shards}")
    todo = modalities or manifest["modalities"]
    report: dict[str, Any] = {
        "max_memory_mb": max_memory_mb,
        "rule": asdict(rule or IndexRule()),
        "mmap": mmap,
        "modalities": {},
    }
    if target_recall is not None:
        report.update(target_recall=target_recall, max_build_seconds=max_build_seconds, rule=None)
    opts = dict(
        max_memory_mb=max_memory_mb,
        factory=factory,
        sample_queries=sample_queries,
        rule=rule,
        seed=seed,
        target_recall=target_recall,
        max_build_seconds=max_build_seconds,
        kinds=kinds,
        progress=progress,
    )
    for modality in todo:
        x = open_embeddings(out, manifest, modality)  # memory-mapped: read in chunks, never all at once
        n, d = x.shape
        if n == 0:
            raise ConfigError(f"'{out}' has no embedded rows to index (every sample was skipped?)")
        if shards is None:
            index, entry = _build_one(x, **opts)
            path = index_path(out, modality)
            write_index_atomic(index, path)
            entry["file_mb"] = round(path.stat().st_size / 2**20, 2)
            (shard_dir(out, modality) / SHARDS).unlink(missing_ok=True)  # this file replaces a sharded build
            report["modalities"][modality] = entry
            continue
        parts = []
        for i, (a, b) in enumerate(part_ranges(n, shards)):
            index, entry = _build_one(x.view(a, b), **opts)
            path = shard_dir(out, modality) / f"part_{i:05d}.faiss"
            write_index_atomic(index, path)
            entry.update(start=a, stop=b, file=path.name, file_mb=round(path.stat().st_size / 2**20, 2))
            entry.pop("candidates", None)
            parts.append(entry)
        write_layout(out, modality, parts)
        index_path(out, modality).unlink(missing_ok=True)  # the parts replace a single-file index
        report["modalities"][modality] = {
            "type": "sharded",
            "parts": len(parts),
            "factory": parts[0]["factory"],
            "n": n,
            "dim": d,
            "search_params": "",
            "build_seconds": round(sum(p["build_seconds"] for p in parts), 3),
            "file_mb": round(sum(p["file_mb"] for p in parts), 2),
            "recall@10": min(
                p.get("recall@10") or 0.0 for p in parts
            ),  # the worst part, each on its own rows
            "recall_queries": sum(p["recall_queries"] for p in parts),
            "part_reports": parts,
        }
    write_metadata_arrow(out)
    atomic_write_text(out / "index" / REPORT, json.dumps(report, indent=2))
    return report


def _build_one(
    x: Rows,
    max_memory_mb: float | None,
    factory: str | None,
    sample_queries: int,
    rule: IndexRule | None,
    seed: int,
    target_recall: float | None,
    max_build_seconds: float | None,
    kinds: tuple[str, ...] | None,
    progress: bool,
) -> tuple[faiss.Index, dict[str, Any]]:
    """One index over the rows of x (all of a modality, or one part), and its report entry."""
    n, d = x.shape
    if target_recall is not None:
        from coalign.search.tune import tune

        index, entry = tune(
            x,
            target_recall,
            max_memory_mb,
            max_build_seconds,
            sample_queries,
            kinds=kinds,
            seed=seed,
            progress=progress,
        )
        entry = {"n": n, "dim": d, **entry}
        entry["recall_queries"] = entry["held_out_queries"]
        entry["build_seconds"] = entry["tuning_s"]
        return index, entry
    choice = choose_index(n, d, max_memory_mb, rule)
    if factory:
        choice = Choice("factory", factory, -1)
    t0 = time.perf_counter()
    index = build(x, choice.factory, seed, progress)
    seconds = time.perf_counter() - t0
    params = search_params(index)
    apply_search_params(index, params)
    k = min(10, n)
    queries = np.sort(np.random.default_rng(seed).permutation(n)[: min(sample_queries, n)])
    return index, {
        "type": choice.kind,
        "factory": choice.factory,
        "n": n,
        "dim": d,
        "search_params": params,
        "build_seconds": round(seconds, 3),
        "memory_estimate_mb": round(choice.memory_bytes / 2**20, 2) if choice.memory_bytes >= 0 else None,
        f"recall@{k}": round(recall_at_k(index, x, queries, k), 4) if len(queries) else None,
        "recall_queries": int(len(queries)),
    }


def add_to_index(out_dir: str | Path, progress: bool = False, chunk: int = 65_536) -> dict[str, Any]:
    """`coalign index OUT --add`: append the rows embedded since the index was built (rows ntotal..n-1
    of each modality) to its FAISS index, without training or rebuilding anything. The IVF lists and
    the quantizer stay as trained: after the corpus has grown several times over, rebuild."""
    from tqdm import tqdm

    out = Path(out_dir)
    manifest = finished_manifest(out)
    report = read_report(out)
    if not report["modalities"]:
        raise ConfigError(f"'{out}' has no index to add to; build one first with `coalign index {out}`")
    for modality, entry in report["modalities"].items():
        path = index_path(out, modality)
        if not path.is_file():
            raise ConfigError(f"'{path}' is missing; build the index again with `coalign index {out}`")
        rows = open_embeddings(out, manifest, modality)
        index = faiss.read_index(str(path))
        start, n = index.ntotal, len(rows)
        if n < start:
            raise ConfigError(
                f"'{out}' holds {n} '{modality}' rows but its index {start}: rows were removed, not "
                f"appended; rebuild with `coalign index {out}`"
            )
        t0 = time.perf_counter()
        for a in tqdm(range(start, n, chunk), desc=f"add {modality}", disable=not progress):
            index.add(np.ascontiguousarray(rows[a : min(a + chunk, n)]))
        if n > start:
            write_index_atomic(index, path)
        entry["n"] = n
        entry.setdefault("additions", []).append(
            {"rows": n - start, "seconds": round(time.perf_counter() - t0, 3)}
        )
        entry["file_mb"] = round(path.stat().st_size / 2**20, 2)
    write_metadata_arrow(out)
    atomic_write_text(out / "index" / REPORT, json.dumps(report, indent=2))
    return report


def read_report(out: Path) -> dict[str, Any]:
    path = Path(out) / "index" / REPORT
    return json.loads(path.read_text()) if path.is_file() else {"modalities": {}}
