"""Per-request facts that belong to no single pool: statements per request, by route and method."""

from __future__ import annotations

import threading
from bisect import bisect_left

from .histogram import COUNT_BUCKETS, Histogram, HistogramCopy

# Requests that ran at most this many statements are also counted per exact number, beside the
# exported histogram's power-of-two buckets: the live page's quantiles are then exact where routes
# live (a route that always runs 3 statements reads 3, not the 4 an interpolation inside (2, 4]
# gives), and the exported buckets (and their ``le`` labels on every dashboard) stay as they are.
EXACT_COUNTS_UP_TO = 128


class RequestStats:
    """``poolwatch_request_queries{route,method}``: how many statements each request ran."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (route, method) -> (the exported histogram, requests per exact statement count 0..128).
        self._queries: dict[tuple[str, str], tuple[Histogram, list[int]]] = {}

    def request_finished(self, labels: tuple[str, str], queries: int) -> None:
        """Count one request's statements under its (route, method)."""
        found = self._queries.get(labels)
        if found is None:
            with self._lock:
                found = self._queries.setdefault(
                    labels, (Histogram(COUNT_BUCKETS), [0] * (EXACT_COUNTS_UP_TO + 1))
                )
        histogram, exact = found
        # Histogram.observe(), inline (lock-free: see the histogram module); most requests run
        # one statement or none, which the first bucket (<= 1) takes without a bisect.
        index = 0 if queries <= histogram.first else bisect_left(histogram.bounds, queries)
        histogram.counts[index] += 1
        histogram.total += queries
        if queries <= EXACT_COUNTS_UP_TO:
            exact[queries] += 1

    def snapshot(self) -> dict[tuple[str, str], HistogramCopy]:
        # A C-level copy first: a request may add a route meanwhile (see the recorder's docstring).
        keys, found = list(self._queries), list(self._queries.values())
        return {labels: histogram.copy() for labels, (histogram, _) in zip(keys, found, strict=False)}

    def exact_snapshot(self) -> dict[tuple[str, str], tuple[HistogramCopy, list[int]]]:
        """Each (route, method)'s histogram and its requests per exact statement count (index =
        statements, up to ``EXACT_COUNTS_UP_TO``). The list is copied after the histogram, so it
        may hold a request or two more than the copy: readers take the smaller total."""
        keys, found = list(self._queries), list(self._queries.values())
        return {
            labels: (histogram.copy(), exact.copy())
            for labels, (histogram, exact) in zip(keys, found, strict=False)
        }
