"""A plain bucket histogram: a list of counts and a sum, cumulated only when scraped."""

from __future__ import annotations

from bisect import bisect_left

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

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """Buckets as prometheus_client's HistogramMetricFamily wants them, and the sum."""
        counts, total = list(self.counts), self.total
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, counts, strict=False):
            running += count
            buckets.append((_format_bound(bound), running))
        buckets.append(("+Inf", running + counts[-1]))
        return buckets, total


def _format_bound(bound: float) -> str:
    return repr(float(bound))
