"""The interval sampler: each pool's exact peaks and totals per interval, kept whether or not anyone
looks, so the live page (and its sizing verdict) opens on history at 3 a.m.

One daemon thread for the process, started when the first pool is watched and ended when the last
one is released (like the leak sweeper). Once an interval (1 s) it ends a row for each pool:

- the exact peak of checkouts out and of callers queued since the last row (``take_peaks()``: the
  hot path compares on every checkout and queue entry, so a burst shorter than the interval shows);
- checkouts, timeouts and the wait histogram's counts in the interval (differences of counters);
- the connection-seconds held inside the interval: ``C(end) - C(start)``, where ``C(t)`` is the
  seconds held by returned checkouts plus the ages of the checkouts out at ``t``, which is exactly
  the connection-seconds held since the pool was watched. A 35 s checkout adds about one second to
  each row it spans, not 35 s to the row where it comes back.

Memory is bounded per pool: the last ``RECENT_ROWS`` rows (5 min at 1 s), and ``LONG_ROWS`` rows of
``LONG_ROW_INTERVALS`` intervals each (6 h of minutes), whatever the uptime.

Garbage-collector re-entry: this module takes no lock that the checkin path takes, and never
iterates a container the checkin path changes except through a C-level copy (see the recorder's
docstring). Its own lock (one per pool) is taken by the sampler and by the page's readers only, so a
checkin that the collector nests inside either never waits for it.

After a fork only the forking thread exists in the child: the child starts a thread of its own and
gives every pool a fresh lock (the parent's thread may have held one at the fork).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple

from .._log import internal_errors
from .recorder import PoolRecorder

INTERVAL_SECONDS = 1.0
RECENT_ROWS = 300
LONG_ROW_INTERVALS = 60
LONG_ROWS = 360
# A reading of C(t) is retried while a checkin or checkout lands in the middle of it.
_CONSISTENT_TRIES = 8

perf_counter = time.perf_counter


class Row(NamedTuple):
    """One pool over one interval (or, in the long ring, over ``LONG_ROW_INTERVALS`` of them)."""

    end: float  # perf_counter() when the interval ended
    seconds: float  # its length
    intervals: int  # sampler intervals it covers
    used: int  # checkouts out at its end
    idle: int  # idle connections in the pool at its end (0 when the pool does not count them)
    peak_used: int  # the most checkouts out at once inside it (exact)
    peak_queued: int  # the most callers queued for a free slot at once inside it (exact)
    checkouts: int
    timeouts: int
    held: float  # connection-seconds held inside it, checkouts still out included
    waits: tuple[int, ...]  # the wait histogram's counts inside it, per bucket; () when none


def merge(rows: Sequence[Row]) -> Row | None:
    """Rows one after the other as one row (None for no rows): sums, maxima, and the end state of
    the last. Column by column, not row by row: the page merges hundreds of rows."""
    if not rows:
        return None
    last = rows[-1]
    waits = [row.waits for row in rows if row.waits]
    return Row(
        end=last.end,
        seconds=sum([row.seconds for row in rows]),
        intervals=sum([row.intervals for row in rows]),
        used=last.used,
        idle=last.idle,
        peak_used=max([row.peak_used for row in rows]),
        peak_queued=max([row.peak_queued for row in rows]),
        checkouts=sum([row.checkouts for row in rows]),
        timeouts=sum([row.timeouts for row in rows]),
        held=sum([row.held for row in rows]),
        waits=tuple(map(sum, zip(*waits, strict=True))) if waits else (),
    )


def joined(first: Row, then: Row) -> Row:
    """Two consecutive rows as one: sums, maxima, and the end state of the later one."""
    return Row(
        end=then.end,
        seconds=first.seconds + then.seconds,
        intervals=first.intervals + then.intervals,
        used=then.used,
        idle=then.idle,
        peak_used=max(first.peak_used, then.peak_used),
        peak_queued=max(first.peak_queued, then.peak_queued),
        checkouts=first.checkouts + then.checkouts,
        timeouts=first.timeouts + then.timeouts,
        held=first.held + then.held,
        waits=add_counts(first.waits, then.waits),
    )


def add_counts(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    if not a:
        return b
    if not b:
        return a
    return tuple(x + y for x, y in zip(a, b, strict=True))


class Reading(NamedTuple):
    """A pool's counters at one instant: rows are differences of two readings."""

    at: float
    used: int
    idle: int
    checkouts: int
    timeouts: int
    held: float  # C(at): connection-seconds held since the pool was watched
    waits: tuple[int, ...]


def connection_seconds(recorder: PoolRecorder) -> tuple[float, float, int]:
    """``(C(now), now, checkouts out now)``: the seconds held by returned checkouts plus the ages
    of the checkouts out at ``now``.

    A checkin takes its entry out of the table a few statements before it adds its hold time to the
    histograms; read in between, that checkout would count in neither. Such a reading shows as a
    mismatch between the checkouts counted and those returned plus those out, or as a counter that
    moved while the table was copied, and is taken again.
    """
    table = recorder.open_checkouts
    total = 0.0
    now = perf_counter()
    starts: list[float] = []
    for _ in range(_CONSISTENT_TRIES):
        checkouts = recorder.checkouts
        returned = recorder.checkin_progress
        finished = recorder.checkins
        # A C-level copy of the values: a checkin nested here by the garbage collector cannot
        # break it.
        entries = list(table.values())
        now = perf_counter()  # after the copy: every entry in it started before now
        starts = [entry[0] for entry in entries]
        total = returned + sum([now - start for start in starts])
        if (
            recorder.checkouts == checkouts
            and recorder.checkin_progress == returned
            and checkouts == finished + len(starts)
        ):
            break
    return total, now, len(starts)


def read(recorder: PoolRecorder) -> Reading:
    held, now, out = connection_seconds(recorder)
    return Reading(
        at=now,
        used=out,
        idle=_idle(recorder.pool),
        checkouts=recorder.checkouts,
        timeouts=sum(list(recorder.timeouts.values())),
        held=held,
        waits=tuple(recorder.wait.counts.copy()),
    )


def _idle(pool: Any) -> int:
    """Idle connections in a pool that counts them (QueuePool); 0 for the others."""
    checkedin = getattr(pool, "checkedin", None)
    if pool is None or not callable(checkedin):
        return 0
    try:
        return max(0, int(checkedin()))
    except Exception:
        return 0


class PoolIntervals:
    """One pool's rows: the recent ring, the long ring, and the long row being filled."""

    def __init__(self, recorder: PoolRecorder, interval: float = INTERVAL_SECONDS) -> None:
        self.interval = interval
        self.lock = threading.Lock()
        self.recent: deque[Row] = deque(maxlen=RECENT_ROWS)
        self.long: deque[Row] = deque(maxlen=LONG_ROWS)
        self.filling: Row | None = None  # the long row being filled from recent rows
        # Bumped with every row (and with every long row), so readers can cache what they build.
        self.version = 0
        self.long_version = 0
        self.started = perf_counter()
        self.last = read(recorder)

    def sample(self, recorder: PoolRecorder) -> Row:
        """End the current interval: one row from the last reading to now."""
        # Peaks first: a checkout counted after this call belongs to the next interval, whose
        # peak starts from the count now.
        peak_used, peak_queued = recorder.take_peaks()
        now = read(recorder)
        last = self.last
        held = max(0.0, now.held - last.held)
        waits = tuple(b - a for a, b in zip(last.waits, now.waits, strict=True))
        row = Row(
            end=now.at,
            seconds=max(0.0, now.at - last.at),
            intervals=1,
            used=now.used,
            idle=now.idle,
            peak_used=max(peak_used, now.used, last.used),
            peak_queued=peak_queued,
            checkouts=max(0, now.checkouts - last.checkouts),
            timeouts=max(0, now.timeouts - last.timeouts),
            held=held,
            waits=waits if any(waits) else (),
        )
        # C(t) never goes back: a reading that missed a checkin in flight is not taken as the base.
        self.last = now if now.held >= last.held else now._replace(held=last.held)
        self.add(row)
        return row

    def add(self, row: Row) -> None:
        with self.lock:
            self.recent.append(row)
            filling = row if self.filling is None else joined(self.filling, row)
            if filling.intervals >= LONG_ROW_INTERVALS:
                self.long.append(filling)
                self.long_version += 1
                self.filling = None
            else:
                self.filling = filling
            self.version += 1

    def rows(
        self, known_long_version: int = -1
    ) -> tuple[int, tuple[Row, ...], Row | None, int, tuple[Row, ...] | None]:
        """``(version, recent rows, the long row being filled, long version, long rows)``, oldest
        first, in one consistent reading; the long rows are None when ``known_long_version`` is
        still theirs (they change once a long row)."""
        with self.lock:
            long = None if known_long_version == self.long_version else tuple(self.long)
            return self.version, tuple(self.recent), self.filling, self.long_version, long

    def current(self, recorder: PoolRecorder) -> Row:
        """The interval under way, from the last row to now, without ending it (the peaks are read,
        not taken: the sampler stays their one consumer)."""
        now = read(recorder)
        last = self.last
        waits = tuple(b - a for a, b in zip(last.waits, now.waits, strict=True))
        return Row(
            end=now.at,
            seconds=max(0.0, now.at - last.at),
            intervals=0,
            used=now.used,
            idle=now.idle,
            peak_used=max(recorder.peak_in_use, now.used, last.used),
            peak_queued=max(recorder.peak_queued, recorder.pending),
            checkouts=max(0, now.checkouts - last.checkouts),
            timeouts=max(0, now.timeouts - last.timeouts),
            held=max(0.0, now.held - last.held),
            waits=waits if any(waits) else (),
        )


class IntervalSampler:
    def __init__(self, interval: float = INTERVAL_SECONDS) -> None:
        self.interval = interval
        self._pools: weakref.WeakKeyDictionary[PoolRecorder, PoolIntervals] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, recorder: PoolRecorder) -> None:
        with self._lock:
            if recorder not in self._pools:
                self._pools[recorder] = PoolIntervals(recorder, self.interval)
            if self._thread is None:
                self._start()

    def discard(self, recorder: PoolRecorder) -> None:
        with self._lock:
            self._pools.pop(recorder, None)
            if not self._pools:
                self._wake.set()

    def of(self, recorder: PoolRecorder) -> PoolIntervals | None:
        """The rows kept for ``recorder``, if it is watched."""
        return self._pools.get(recorder)

    def sample_now(self) -> None:
        for recorder, intervals in list(self._pools.items()):
            try:
                intervals.sample(recorder)
            except Exception as error:
                internal_errors.record("interval_sample", error)

    def after_fork_in_child(self) -> None:
        """Only the forking thread exists in the child: sample there again, with fresh locks."""
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None
        for intervals in list(self._pools.values()):
            intervals.lock = threading.Lock()
        if len(self._pools):
            self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="poolwatch-intervals", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_at = perf_counter() + self.interval
        while True:
            self._wake.wait(max(0.0, next_at - perf_counter()))
            with self._lock:
                # Decided under the lock that add() takes, so a pool added now is never orphaned.
                if not self._pools:
                    self._thread = None
                    return
                self._wake.clear()
            self.sample_now()
            # Keep the cadence; after a long stall (a suspended VM) start again from now rather
            # than catching up with rows of no length.
            next_at = max(next_at + self.interval, perf_counter())


sampler = IntervalSampler()


def _restart_after_fork() -> None:
    try:
        sampler.after_fork_in_child()
    except Exception as error:
        internal_errors.record("interval_sample_fork", error)


os.register_at_fork(after_in_child=_restart_after_fork)
