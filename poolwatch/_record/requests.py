"""Per-request facts that belong to no single pool: statements per request, by route."""

from __future__ import annotations

import threading

from .histogram import COUNT_BUCKETS, Histogram, HistogramCopy


class RequestStats:
    """``poolwatch_request_queries{route}``: how many statements each request ran."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queries: dict[str, Histogram] = {}

    def request_finished(self, route: str, queries: int) -> None:
        with self._lock:
            histogram = self._queries.get(route)
            if histogram is None:
                histogram = self._queries[route] = Histogram(COUNT_BUCKETS)
            histogram.observe(queries)

    def snapshot(self) -> dict[str, HistogramCopy]:
        with self._lock:
            return {route: h.copy() for route, h in self._queries.items()}
