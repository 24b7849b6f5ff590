"""Request metrics in the Prometheus text exposition format (version 0.0.4), written by hand so that
serving needs no extra dependency: request counts by method, route and status, and a latency
histogram by route."""

from __future__ import annotations

import threading
from collections import Counter

from starlette.routing import Match

# Label values come only from these sets, so the label set is bounded whatever clients send: a method
# outside HTTP's own is "other", a path no route matches is "unmatched" (see route_label).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
OTHER_METHOD = "other"

# Seconds; spans a cached health check to a slow image encode on CPU.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def route_label(routes, scope) -> str:
    """The route template ("/items/{item_id:path}"), never the raw path: labels stay few whatever
    paths clients send. Matched on a copy because routing mutates the scope."""
    partial = None
    for route in routes:
        match, _ = route.matches(dict(scope))
        if match == Match.FULL:
            return route.path
        if match == Match.PARTIAL and partial is None:
            partial = route.path  # the path matched but not the method (405)
    return partial or "unmatched"


def method_label(method: str) -> str:
    return method if method in METHODS else OTHER_METHOD


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str, str]] = Counter()
        self._buckets: dict[str, list[int]] = {}  # route -> cumulative counts per bucket
        self._sum: Counter[str] = Counter()
        self._count: Counter[str] = Counter()

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method_label(method)
        with self._lock:
            self._requests[(method, route, str(status))] += 1
            counts = self._buckets.setdefault(route, [0] * len(BUCKETS))
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            self._sum[route] += seconds
            self._count[route] += 1

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; `gauges` maps a metric name to (help, value)."""
        lines = [
            "# HELP coalign_http_requests_total HTTP requests answered, by method, route and status.",
            "# TYPE coalign_http_requests_total counter",
        ]
        with self._lock:
            for (method, route, status), n in sorted(self._requests.items()):
                labels = f'method="{_escape(method)}",route="{_escape(route)}",status="{status}"'
                lines.append(f"coalign_http_requests_total{{{labels}}} {n}")
            lines += [
                "# HELP coalign_http_request_duration_seconds Time to answer a request, by route.",
                "# TYPE coalign_http_request_duration_seconds histogram",
            ]
            for route in sorted(self._buckets):
                r = f'route="{_escape(route)}"'
                for bound, n in zip(BUCKETS, self._buckets[route], strict=True):
                    lines.append(f'coalign_http_request_duration_seconds_bucket{{{r},le="{bound}"}} {n}')
                lines.append(
                    f'coalign_http_request_duration_seconds_bucket{{{r},le="+Inf"}} {self._count[route]}'
                )
                lines.append(f"coalign_http_request_duration_seconds_sum{{{r}}} {self._sum[route]:.6f}")
                lines.append(f"coalign_http_request_duration_seconds_count{{{r}}} {self._count[route]}")
        for name, (help_text, value) in gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"
