"""The live page's memory: a few minutes of each pool, sampled while someone reads the page.

Nothing here runs unless ``/poolwatch/state`` is read, so a service nobody looks at keeps nothing.
Samples are taken at most about once a second (two open tabs do not double the work) and those older
than the window fall off; the deque's bound caps the memory whatever the clock does.

Only readers of the page touch a history, never the checkout or checkin path, so its plain lock is
safe from garbage-collector re-entry.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

WINDOW_SECONDS = 300.0
MIN_SPACING_SECONDS = 0.9


@dataclass(frozen=True, slots=True)
class Sample:
    """One pool at one instant: the gauges, and the counters that make rates over the window."""

    at: float  # time.monotonic()
    used: int
    idle: int
    pending: int
    checkouts: int
    timeouts: int
    wait_counts: tuple[int, ...]  # poolwatch_wait_seconds per bucket (not cumulative)
    held_seconds: float  # sum of hold times of returned checkouts, every route
    held_count: int  # how many returned checkouts that sum covers


class PoolHistory:
    def __init__(self, window: float = WINDOW_SECONDS, spacing: float = MIN_SPACING_SECONDS) -> None:
        self.window = window
        self.spacing = spacing
        self._lock = threading.Lock()
        self._samples: deque[Sample] = deque(maxlen=int(window / spacing) + 2)

    def add(self, sample: Sample) -> None:
        """Keep ``sample`` unless one was kept less than ``spacing`` ago."""
        with self._lock:
            samples = self._samples
            if samples and sample.at - samples[-1].at < self.spacing:
                return
            if samples and _went_back(samples[-1], sample):
                # The counters started again (a new recorder under the same name): the old
                # samples would make negative rates.
                samples.clear()
            samples.append(sample)
            horizon = sample.at - self.window
            while samples and samples[0].at < horizon:
                samples.popleft()

    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)


def _went_back(before: Sample, after: Sample) -> bool:
    return after.checkouts < before.checkouts or after.held_count < before.held_count
