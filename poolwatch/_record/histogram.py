"""A bucket histogram that threads write without a lock: one ticker per bucket and a sum.

Each bucket is an ``itertools.count``: ``next()`` on it is one C call, so an increment is atomic
between threads and cannot be re-entered by the garbage collector halfway (a nested checkin only
adds its own tick). The sum is a float attribute updated with ``+=``: CPython (3.11, 3.12) checks
for a thread switch only at calls and backward jumps, never between the load, the add and the store
of that statement, and floats are not tracked by the garbage collector, so making one never starts
a collection. (A free-threaded build would need a lock here; poolwatch does not support one yet.)

Readers copy the tickers' values at any time, without a lock; a copy taken while threads observe
may pair a sum with counts one observation apart, which Prometheus tolerates (the next scrape
agrees).
"""

from __future__ import annotations

import itertools
import sys
from bisect import bisect_left
from collections.abc import Iterable
from functools import cache
from operator import itemgetter
from typing import NamedTuple

# Seconds. Fine at the low end, where a healthy pool lives, and up to a minute, past any sane
# pool_timeout, so a starving pool still lands in a real bucket.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

# Statements per request: powers of two show an N+1 pattern as a jump of whole buckets.
COUNT_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


# How many times ``next()`` was called on an ``itertools.count()`` started at 0. ``next(count)`` is
# a single atomic C call, which makes it the cheapest exact counter shared between threads; reading
# it without advancing goes through its repr, ``count(N)``, or on 3.11 through its pickling support,
# ``__reduce__`` -> ``(count, (N,))``, about 4x faster (3.12 deprecates that and 3.14 removes it).
# A scrape reads about ten thousand, so a histogram's are read with ``map`` over C functions
# (a method descriptor and ``itemgetter``s): no bytecode runs per bucket.
if sys.version_info < (3, 12):
    _reduce = itertools.count.__reduce__
    _arguments = itemgetter(1)
    _first = itemgetter(0)

    def read_tickers(tickers: Iterable[itertools.count[int]]) -> list[int]:
        """The values of ``tickers``, in order."""
        return list(map(_first, map(_arguments, map(_reduce, tickers))))

else:
    _digits = itemgetter(slice(6, -1))  # "count(12)" -> "12"

    def read_tickers(tickers: Iterable[itertools.count[int]]) -> list[int]:
        """The values of ``tickers``, in order."""
        return list(map(int, map(_digits, map(repr, tickers))))


def ticker_value(ticker: itertools.count[int]) -> int:
    """The value of one ticker (see ``read_tickers``)."""
    return read_tickers((ticker,))[0]


class Histogram:
    """Observations tick ``tickers[i]`` for the first bound >= value; the last ticker is +Inf.

    The hot paths inline ``observe`` (a call costs as much as the work there), testing ``first``
    before bisecting: a healthy pool's waits fall in the first bucket.
    """

    __slots__ = ("bounds", "first", "tickers", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.first = bounds[0]
        self.tickers = [itertools.count() for _ in range(len(bounds) + 1)]
        self.total = 0.0

    def observe(self, value: float) -> None:
        next(self.tickers[0 if value <= self.first else bisect_left(self.bounds, value)])
        self.total += value

    @property
    def count(self) -> int:
        return sum(read_tickers(self.tickers))

    def copy(self) -> HistogramCopy:
        """The counts and sum now; safe at any time, on any thread, without a lock."""
        total = self.total
        return HistogramCopy(self.bounds, read_tickers(self.tickers), total)


class HistogramCopy(NamedTuple):
    """One histogram at one instant: per-bucket counts (not cumulative; the last is +Inf)."""

    bounds: tuple[float, ...]
    counts: list[int]
    total: float

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """Buckets as prometheus_client's HistogramMetricFamily wants them, and the sum."""
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(bound_labels(self.bounds), self.counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets, self.total


@cache
def bound_labels(bounds: tuple[float, ...]) -> tuple[str, ...]:
    """The ``le`` strings of a bucket layout, +Inf included; formatted once per layout."""
    return (*(repr(float(bound)) for bound in bounds), "+Inf")
