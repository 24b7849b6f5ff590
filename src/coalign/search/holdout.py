"""The measuring half of recall-targeted tuning (coalign.search.tune builds, this file judges): held-out
query rows with their exact ground truth, the recall@k of an index's answers on them, single-query
latency, and the sweep of one candidate's search parameter to the cheapest setting reaching a target.
Nothing here builds an index; everything takes a built one.

A setting reaches the target only when a lower confidence bound of its recall does, not its mean:
the held-out rows are a sample, and a mean just over the target promises about as often too much as
too little on the queries that come later (0.984 on fresh queries for a 0.99 target at 1M).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import faiss
import numpy as np

from coalign.search import take_rows
from coalign.search.index import apply_search_params

if TYPE_CHECKING:
    from coalign.search.index import Rows
    from coalign.search.tune import Candidate

# Rows per step, a bounded float32 copy: of the exact ground truth here; of the adds (the progress bar's
# step) and the list assignment in tune.
CHUNK = 32_768
# One-sided 95 % normal quantile of the recall bound. The bound is taken over per-query recalls, not
# as a Wilson interval over the k * count hits: the hits of one query are not independent (a query in
# a crowded region misses several of its k at once), so counting them as k * count Bernoulli trials
# would understate the spread. The queries are drawn independently, so their mean recall is a mean of
# iid values in [0, 1] and, at the hundreds of queries the tuner holds out, close to normal.
Z = 1.645
# A sweep step (doubling nprobe or efSearch) that raises the mean recall by less than this ends the
# sweep of that candidate (see `_walk`): 10 more hits in 10,000 (1,000 queries, k = 10).
PLATEAU = 0.001


class Holdout:
    """Held-out query rows, and the exact k-th best score of each over the other rows."""

    def __init__(self, x: Rows, count: int, k: int, seed: int):
        n = len(x)
        rng = np.random.default_rng(seed)
        self.held = np.sort(rng.choice(n, size=count, replace=False))
        mask = np.zeros(n, dtype=bool)
        mask[self.held] = True
        self.kept = np.flatnonzero(~mask)  # index position -> row, while tuning
        self.q = take_rows(x, self.held)
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

    def recalls(self, ids: np.ndarray) -> np.ndarray:
        """(count,) per query, the share of its k results scoring at least the exact k-th (ties in any
        order count)."""
        valid = ids >= 0
        rows = self.kept[np.where(valid, ids, 0)]
        found = take_rows(self.x, rows.ravel()).reshape(*rows.shape, -1)  # (count, k, d)
        scores = np.einsum("qd,qkd->qk", self.q, found)
        return (valid & (scores >= self.kth[:, None] - 1e-5)).sum(axis=1) / ids.shape[1]

    def recall(self, ids: np.ndarray) -> float:
        """Mean recall@k over the held-out queries."""
        return float(self.recalls(ids).mean())


def recall_bound(r: np.ndarray, z: float = Z) -> tuple[float, float]:
    """(mean, lower bound mean - z * std / sqrt(count)) of per-query recalls r (std with ddof 1)."""
    mean = float(r.mean())
    spread = float(r.std(ddof=1)) if len(r) > 1 else 0.0
    return mean, mean - z * spread / np.sqrt(len(r))


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


def sweep(index: faiss.Index, cand: Candidate, hold: Holdout, targets: Sequence[float]) -> dict[float, dict]:
    """{target: the cheapest setting(s) whose recall bound reaches it, the fastest of them timed; or the
    best bound seen (with its mean recall)}. Each setting is searched and timed at most once, whatever
    the number of targets: the walk for 0.99 passes the settings of 0.9 and 0.95."""
    measured: dict[str, tuple[float, float, float]] = {}  # params -> (recall, bound, batch_qps)
    timed: dict[str, tuple[float, float]] = {}  # params -> (p50, p99)

    def measure(params: str) -> tuple[float, float, float]:
        if params not in measured:
            apply_search_params(index, params)
            t = time.perf_counter()
            ids = index.search(hold.q, hold.k)[1]
            qps = len(hold.q) / max(time.perf_counter() - t, 1e-9)
            measured[params] = (*recall_bound(hold.recalls(ids)), qps)
        return measured[params]

    def latency(params: str) -> tuple[float, float]:
        if params not in timed:
            apply_search_params(index, params)
            timed[params] = latency_ms(index, hold.q, hold.k)
        return timed[params]

    # The hardest target first: its walk measures every setting an easier one can stop at.
    return {t: _walk(cand, t, measure, latency) for t in sorted(targets, reverse=True)}


def _walk(cand: Candidate, target: float, measure, latency) -> dict:
    """Up each search parameter's values (doubling: nprobe, efSearch) to the first setting whose
    bound reaches `target`, per re-ranking factor. A walk that has stopped gaining (the mean recall
    rose by less than PLATEAU over the last doubling) ends there: the code's own error caps the
    recall (SQ8 at 10M, PQ anywhere), and the settings left are the costliest, up to a scan of every
    list, which at 10M took longer than every build together."""
    best = (-1.0, -1.0, "")  # (bound, recall, params)
    reached = []  # (params, recall, bound, batch_qps)
    values: list[int | None] = list(cand.values) or [None]
    capped = False
    for kf in cand.k_factors:
        before = None
        for v in values:
            params = cand.params(v, kf)
            recall, bound, qps = measure(params)
            best = max(best, (bound, recall, params))
            if bound >= target:
                reached.append((params, recall, bound, qps))
                values = [u for u in values if u is None or u <= v]  # more re-ranking needs no more probes
                break
            if before is not None and recall - before < PLATEAU:
                capped = True
                break
            before = recall
    seen = {"best_recall": round(best[1], 4), "best_bound": round(best[0], 4)}
    if not reached:
        return {"status": "below target", **seen, "best_params": best[2], "plateau": capped}
    p50, p99, params, recall, bound, qps = min((*latency(p), p, r, b, q) for p, r, b, q in reached)
    return {
        "status": "reaches target",
        "params": params,
        "recall": round(recall, 4),
        "recall_bound": round(bound, 4),
        "p50_ms": p50,
        "p99_ms": p99,
        "batch_qps": round(qps, 1),
        **seen,
    }
