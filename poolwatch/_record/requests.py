"""Per-request facts that belong to no single pool: statements per request, by route and method."""

from __future__ import annotations

import threading

from .histogram import COUNT_BUCKETS, Histogram, HistogramCopy


class RequestStats:
    """``poolwatch_request_queries{route,method}``: how many statements each request ran."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queries: dict[tuple[str, str], Histogram] = {}

    def request_finished(self, labels: tuple[str, str], queries: int) -> None:
        """Count one request's statements under its (route, method)."""
        histogram = self._queries.get(labels)
        if histogram is None:
            with self._lock:
                histogram = self._queries.setdefault(labels, Histogram(COUNT_BUCKETS))
        histogram.observe(queries)

    def snapshot(self) -> dict[tuple[str, str], HistogramCopy]:
        # A C-level copy first: a request may add a route meanwhile (see the recorder's docstring).
        keys, histograms = list(self._queries), list(self._queries.values())
        return {labels: histogram.copy() for labels, histogram in zip(keys, histograms, strict=False)}
