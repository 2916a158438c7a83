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


@dataclass(frozen=True, slots=True)
class HistoryView:
    """The kept samples as the page sends them, and the aggregates over them. Built once per kept
    sample, not once per read (several tabs may read each second).

    The charted series are kept as JSON number lists without their brackets (``"3,4,4"``): each
    number is written once, when its sample is kept, and a view only joins them.
    """

    samples: tuple[Sample, ...]
    at: tuple[float, ...]
    used_json: str
    idle_json: str
    pending_json: str
    ages_json: str  # whole seconds before the newest kept sample
    peak_used: int
    sum_used: int
    max_pending: int


class PoolHistory:
    def __init__(self, window: float = WINDOW_SECONDS, spacing: float = MIN_SPACING_SECONDS) -> None:
        self.window = window
        self.spacing = spacing
        self._lock = threading.Lock()
        bound = int(window / spacing) + 2
        self._samples: deque[Sample] = deque(maxlen=bound)
        # The charted columns, kept beside the samples (the series as JSON numbers) so that a view
        # is a few C-level copies and joins.
        self._at: deque[float] = deque(maxlen=bound)
        self._used: deque[int] = deque(maxlen=bound)
        self._pending: deque[int] = deque(maxlen=bound)
        self._used_json: deque[str] = deque(maxlen=bound)
        self._idle_json: deque[str] = deque(maxlen=bound)
        self._pending_json: deque[str] = deque(maxlen=bound)
        self._view: HistoryView | None = None

    def add(self, sample: Sample) -> bool:
        """Keep ``sample`` unless one was kept less than ``spacing`` ago; say whether it was kept."""
        with self._lock:
            samples = self._samples
            columns = (
                self._at, self._used, self._pending, self._used_json, self._idle_json, self._pending_json
            )  # fmt: skip
            if samples and sample.at - samples[-1].at < self.spacing:
                return False
            if samples and _went_back(samples[-1], sample):
                # The counters started again (a new recorder under the same name): the old
                # samples would make negative rates.
                samples.clear()
                for column in columns:
                    column.clear()
            samples.append(sample)
            self._at.append(sample.at)
            self._used.append(sample.used)
            self._pending.append(sample.pending)
            self._used_json.append(str(int(sample.used)))
            self._idle_json.append(str(int(sample.idle)))
            self._pending_json.append(str(int(sample.pending)))
            horizon = sample.at - self.window
            while samples and samples[0].at < horizon:
                samples.popleft()
                for column in columns:
                    column.popleft()
            self._view = None
            return True

    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    def forget_view(self) -> None:
        with self._lock:
            self._view = None

    def view(self) -> HistoryView:
        with self._lock:
            view = self._view
            if view is None:
                at = tuple(self._at)
                newest = at[-1] if at else 0.0
                used, pending = tuple(self._used), tuple(self._pending)
                view = self._view = HistoryView(
                    samples=tuple(self._samples),
                    at=at,
                    used_json=",".join(self._used_json),
                    idle_json=",".join(self._idle_json),
                    pending_json=",".join(self._pending_json),
                    ages_json=",".join([str(int(newest - t + 0.5)) for t in at]),
                    peak_used=max(used, default=0),
                    sum_used=sum(used),
                    max_pending=max(pending, default=0),
                )
            return view


def _went_back(before: Sample, after: Sample) -> bool:
    return after.checkouts < before.checkouts or after.held_count < before.held_count
