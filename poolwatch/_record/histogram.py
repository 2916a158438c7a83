"""A plain bucket histogram: a list of counts and a sum, cumulated only when scraped."""

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
    """Observations land in ``counts[i]`` for the first bound >= value; the last slot is +Inf.

    Not thread-safe by itself: the recorder that owns it serialises writers.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def copy(self) -> HistogramCopy:
        """A copy to format later; callers hold the lock that serialises the writers."""
        return HistogramCopy(self.bounds, list(self.counts), self.total)


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
