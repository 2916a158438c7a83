"""Threadpool starvation: the sync-endpoint deadlock, detected and logged once per episode.

With a sync ``yield`` session dependency and more concurrent requests than pool connections, the
threads holding every AnyIO token wait for connections held by requests that wait for a token to
run their next sync step: the service hangs while the database is idle (FastAPI discussions #3205).
The signature: callers wait for a pool, every token is taken, tasks wait for a token, and no
connection came back for a while.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

from .._log import internal_errors
from .._record.context import route_label
from .._record.events import ThreadpoolStarvation, emit
from .._record.recorder import PoolRecorder
from .threadpool import read_threadpool
from .watched import Watched

# A pool is starved when callers wait for it, every thread token is taken, tasks wait for a token,
# and no connection came back for this long. Far above a healthy pool's hold times, far below the
# usual pool_timeout (30 s), so the event comes before the timeouts do.
STARVATION_AFTER_SECONDS = 10.0
CHECK_INTERVAL_SECONDS = 1.0


@dataclass
class _PoolProgress:
    checkins: float  # the recorder's checkin_progress
    since: float  # monotonic time checkins last changed
    reported: bool = False  # this episode was logged


class StarvationCheck:
    """Watches one PoolWatch's pools against its app's threadpool; logs once per episode."""

    def __init__(self, watch: Watched, after_seconds: float = STARVATION_AFTER_SECONDS) -> None:
        self._watch = watch
        self._after = after_seconds
        self._progress: dict[PoolRecorder, _PoolProgress] = {}

    def check(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        state = read_threadpool(self._watch.app_loop)
        try:
            recorders = self._watch.recorders
        except KeyError:  # an engine is being released meanwhile; the next check sees the rest
            return
        for gone in [r for r in self._progress if r not in recorders]:
            del self._progress[gone]
        for recorder in recorders:
            progress = self._progress.get(recorder)
            checkins = recorder.checkin_progress
            if progress is None or progress.checkins != checkins:
                self._progress[recorder] = _PoolProgress(checkins, now)
                continue
            pending = recorder.pending
            starved = (
                state is not None
                and state.capacity is not None
                and state.busy >= state.capacity
                and state.waiting > 0
                and pending > 0
                and now - progress.since >= self._after
            )
            if not starved:
                if pending == 0 or state is None or state.capacity is None or state.busy < state.capacity:
                    progress.reported = False  # the episode is over; the next one is logged again
                continue
            if progress.reported:
                continue
            progress.reported = True
            assert state is not None and state.capacity is not None
            emit(
                ThreadpoolStarvation(
                    pool=recorder.name,
                    threads_busy=state.busy,
                    threads_waiting=state.waiting,
                    threads_capacity=state.capacity,
                    callers_waiting=pending,
                    checked_out=len(recorder.open_checkouts),
                    seconds_without_checkin=now - progress.since,
                    routes=routes_holding(recorder),
                )
            )


def routes_holding(recorder: PoolRecorder) -> dict[str, int]:
    """How many connections each route holds now, most first."""
    with recorder.lock:
        entries = list(recorder.open_checkouts.values())  # a C-level copy; see the recorder
    counts: dict[str, int] = {}
    for entry in entries:
        route = route_label(entry[1])
        counts[route] = counts.get(route, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


class StarvationWatcher:
    """One daemon thread for the process that runs every PoolWatch's check each second.

    Started when the first app loop is noted and ended when no check is left, like the leak
    sweeper; it reads counters and the limiter only, so it never blocks the app.
    """

    def __init__(self, interval: float = CHECK_INTERVAL_SECONDS) -> None:
        self._interval = interval
        self._checks: weakref.WeakValueDictionary[int, StarvationCheck] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, check: StarvationCheck) -> None:
        with self._lock:
            self._checks[id(check)] = check
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="poolwatch-starvation-check", daemon=True
                )
                self._thread.start()

    def discard(self, check: StarvationCheck) -> None:
        with self._lock:
            self._checks.pop(id(check), None)
            if not self._checks:
                self._wake.set()

    def check_now(self) -> None:
        for check in self._current():
            try:
                check.check()
            except Exception as error:
                internal_errors.record("starvation_check", error)

    def _current(self) -> Iterator[StarvationCheck]:
        with contextlib.suppress(RuntimeError):  # a weak value went away while copying
            yield from list(self._checks.values())

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            with self._lock:
                if not self._checks:
                    self._thread = None
                    return
                self._wake.clear()
            self.check_now()


watcher = StarvationWatcher()
