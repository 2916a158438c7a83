"""A bucket histogram that threads write without a lock: a list of bucket counts and a sum.

An observation is two statements, ``counts[i] += 1`` and ``total += value``. CPython (3.11, 3.12)
checks for a thread switch only at calls and backward jumps, never between the load, the add and the
store of one such statement, and neither an int nor a float is tracked by the garbage collector,
so making one never starts a collection: no other thread, and no checkin that the collector nests
here, can come between the read and the write, and no count is lost. (A free-threaded build would
need a lock here; poolwatch does not support one yet.) tests/test_pool_metrics.py holds it to
exact counts under 8 threads switching every microsecond, tests/test_gc_reentry.py under forced
collections.

Readers copy the counts at any time, without a lock (``list.copy`` is one C call); a copy taken
while threads observe may pair a sum with counts one observation apart, which Prometheus tolerates
(the next scrape agrees).
"""

from __future__ import annotations

from bisect import bisect_left
from functools import cache
from typing import NamedTuple

# Seconds. Fine at the low end, where a healthy pool lives, and up to a minute, past any sane
# pool_timeout, so a starving pool still lands in a real bucket.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

# Statements per request: powers of two show an N+1 pattern as a jump of whole buckets.
COUNT_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Histogram:
    """Observations add 1 to ``counts[i]`` for the first bound >= value; the last count is +Inf.

    The hot paths inline ``observe`` (a call costs as much as the work there), testing ``first``
    before bisecting: a healthy pool's waits fall in the first bucket.
    """

    __slots__ = ("bounds", "counts", "first", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.first = bounds[0]
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[0 if value <= self.first else bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def copy(self) -> HistogramCopy:
        """The counts and sum now; safe at any time, on any thread, without a lock."""
        total = self.total
        return HistogramCopy(self.bounds, self.counts.copy(), total)


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
