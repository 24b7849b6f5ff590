"""The measuring half of recall-targeted tuning (coalign.search.tune builds, this file judges): held-out
query rows with their exact ground truth, the recall@k of an index's answers on them, single-query
latency, and the sweep of one candidate's search parameter to the cheapest setting reaching a target.
Nothing here builds an index; everything takes a built one.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import faiss
import numpy as np

from coalign.search.index import apply_search_params

if TYPE_CHECKING:
    from coalign.search.tune import Candidate

# Rows per step, a bounded float32 copy: of the exact ground truth here; of the adds (the progress bar's
# step) and the list assignment in tune.
CHUNK = 32_768


class Holdout:
    """Held-out query rows, and the exact k-th best score of each over the other rows."""

    def __init__(self, x: np.ndarray, count: int, k: int, seed: int):
        n = len(x)
        rng = np.random.default_rng(seed)
        self.held = np.sort(rng.choice(n, size=count, replace=False))
        mask = np.zeros(n, dtype=bool)
        mask[self.held] = True
        self.kept = np.flatnonzero(~mask)  # index position -> row, while tuning
        self.q = np.ascontiguousarray(x[self.held])
        self.k = k
        best = np.full((count, 0), -np.inf, dtype=np.float32)
        step = CHUNK // 2  # (count, step) scores at a time
        for a in range(0, n, step):
            s = self.q @ x[a : a + step].T
            s[:, mask[a : a + step]] = -np.inf  # a query is not its own neighbour
            s = np.concatenate([best, s], axis=1)
            best = -np.partition(-s, min(k, s.shape[1]) - 1, axis=1)[:, :k]
        self.kth = np.sort(best, axis=1)[:, 0]  # (count,)
        self.x = x

    def recall(self, ids: np.ndarray) -> float:
        """Share of returned results scoring at least the exact k-th (ties in any order count)."""
        valid = ids >= 0
        rows = self.kept[np.where(valid, ids, 0)]
        scores = np.einsum("qd,qkd->qk", self.q, self.x[rows])
        return float((valid & (scores >= self.kth[:, None] - 1e-5)).sum() / ids.size)


def latency_ms(index: faiss.Index, q: np.ndarray, k: int, most: int = 200, budget_s: float = 3.0):
    """(p50, p99) of one-query searches over up to `most` queries (fewer once `budget_s` is spent)."""
    index.search(q[:1], k)  # warm caches and thread pools
    times, start = [], time.perf_counter()
    for i in range(min(len(q), most)):
        t = time.perf_counter()
        index.search(q[i : i + 1], k)
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget_s and len(times) >= 5:
            break
    ms = 1000 * np.array(times)
    return round(float(np.percentile(ms, 50)), 3), round(float(np.percentile(ms, 99)), 3)


def sweep(index: faiss.Index, cand: Candidate, hold: Holdout, target: float) -> dict:
    """The cheapest setting(s) reaching `target`, the fastest of them timed; or the best recall seen."""
    best = (-1.0, "")
    reached = []  # (params, recall, batch_qps)
    values: list[int | None] = list(cand.values) or [None]
    for kf in cand.k_factors:
        for v in values:
            params = cand.params(v, kf)
            apply_search_params(index, params)
            t = time.perf_counter()
            ids = index.search(hold.q, hold.k)[1]
            qps = len(hold.q) / max(time.perf_counter() - t, 1e-9)
            recall = hold.recall(ids)
            best = max(best, (recall, params))
            if recall >= target:
                reached.append((params, recall, qps))
                values = [u for u in values if u is None or u <= v]  # more re-ranking needs no more probes
                break
    if not reached:
        return {"status": "below target", "best_recall": round(best[0], 4), "best_params": best[1]}
    timed = []
    for params, recall, qps in reached:
        apply_search_params(index, params)
        p50, p99 = latency_ms(index, hold.q, hold.k)
        timed.append((p50, p99, params, recall, qps))
    p50, p99, params, recall, qps = min(timed)
    return {
        "status": "reaches target",
        "params": params,
        "recall": round(recall, 4),
        "p50_ms": p50,
        "p99_ms": p99,
        "batch_qps": round(qps, 1),
        "best_recall": round(best[0], 4),
    }
