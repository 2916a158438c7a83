"""Per-request facts that belong to no single pool: statements per request, by route and method."""

from __future__ import annotations

import threading
from bisect import bisect_left

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
        # Histogram.observe(), inline (lock-free: see the histogram module); most requests run
        # one statement or none, which the first bucket (<= 1) takes without a bisect.
        index = 0 if queries <= histogram.first else bisect_left(histogram.bounds, queries)
        histogram.counts[index] += 1
        histogram.total += queries

    def snapshot(self) -> dict[tuple[str, str], HistogramCopy]:
        # A C-level copy first: a request may add a route meanwhile (see the recorder's docstring).
        keys, histograms = list(self._queries), list(self._queries.values())
        return {labels: histogram.copy() for labels, histogram in zip(keys, histograms, strict=False)}
