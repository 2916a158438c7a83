"""Per-pool recorder: plain counters, bucket arrays and the table of live checkouts.

Everything here is written on the hot path, so it is plain Python objects under one lock per pool:
no prometheus_client objects, no label tuples built per event, no stack walks beyond the cached
borrow-site lookup. The collector reads a snapshot at scrape time.

The lock is re-entrant because the garbage collector may return a lost connection (and so call
``checked_in``) from any allocation, including one made while this thread holds the lock.
"""

from __future__ import annotations

import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import CodeType
from typing import TYPE_CHECKING, Any

from ._borrow_site import borrow_site, borrow_stack, describe_site
from ._context import NO_REQUEST, RequestContext, current_request, route_label
from ._histogram import Histogram
from ._log import logger

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import Pool

    from ._settings import PoolWatchSettings

OPERATIONS = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRANSACTION", "DDL", "OTHER")

perf_counter = time.perf_counter


def _ignore_weakref(_: Any) -> None:
    """Give our weakref a callback so CPython clears it before running finalizers (gh-135552)."""


class CheckoutEntry:
    """One connection out of the pool right now."""

    __slots__ = ("started", "request", "fairy_ref", "site", "stack", "leaked")

    def __init__(
        self,
        started: float,
        request: RequestContext | None,
        fairy_ref: weakref.ref[Any],
        site: tuple[CodeType, int] | None,
        stack: traceback.StackSummary | None,
    ) -> None:
        self.started = started
        self.request = request
        self.fairy_ref = fairy_ref
        self.site = site
        self.stack = stack
        self.leaked = False


@dataclass
class LiveCheckouts:
    """What the table of checkouts says at one instant."""

    count: int = 0
    oldest_age: float = 0.0
    leaked: int = 0


@dataclass
class RecorderSnapshot:
    """A consistent copy of a recorder's counters, taken under its lock."""

    checkouts: int
    checkins: int
    connects: int
    disconnects: int
    timeouts: int
    pre_ping_failures: int
    pending: int
    invalidations: dict[str, int]
    leaks: dict[str, int]
    gc_reclaimed: dict[str, int]
    after_response: dict[str, int]
    query_errors: dict[tuple[str, str], int]
    wait: tuple[list[tuple[str, float]], float]
    connect_time: tuple[list[tuple[str, float]], float]
    use: dict[str, tuple[list[tuple[str, float]], float]]
    query: dict[str, tuple[list[tuple[str, float]], float]]
    live: LiveCheckouts = field(default_factory=LiveCheckouts)


class PoolRecorder:
    """Counts for one named pool (one engine), across ``engine.dispose()``."""

    def __init__(self, name: str, engine: Engine, settings: PoolWatchSettings) -> None:
        self.name = name
        self._engine_ref = weakref.ref(engine)
        self.leak_threshold = settings.leak_threshold_seconds
        self.capture_site = settings.leak_threshold_seconds > 0
        self.capture_stack = settings.leak_capture_stack and self.capture_site
        self.dialect = engine.dialect.name
        self.driver = engine.dialect.driver
        self.lock = threading.RLock()

        self.checkouts = 0
        self.checkins = 0
        self.connects = 0
        self.disconnects = 0
        self.timeouts = 0
        self.pre_ping_failures = 0
        self.pending = 0
        self.invalidations: dict[str, int] = {}
        self.leaks: dict[str, int] = {NO_REQUEST: 0}
        self.gc_reclaimed: dict[str, int] = {NO_REQUEST: 0}
        self.after_response: dict[str, int] = {}
        self.query_errors: dict[tuple[str, str], int] = {}
        self.wait = Histogram()
        self.connect_time = Histogram()
        self.use: dict[str, Histogram] = {NO_REQUEST: Histogram()}
        self.query: dict[str, Histogram] = {op: Histogram() for op in OPERATIONS}
        # Keyed by SQLAlchemy's connection record, which outlives the checkout and is hashable.
        self.open_checkouts: dict[Any, CheckoutEntry] = {}

    @property
    def engine(self) -> Engine | None:
        return self._engine_ref()

    @property
    def pool(self) -> Pool | None:
        engine = self._engine_ref()
        return None if engine is None else engine.pool

    # -- hot path: checkout and checkin ---------------------------------------------------------

    def wait_started(self) -> None:
        with self.lock:
            self.pending += 1

    def checked_out(self, fairy: Any, started: float) -> None:
        now = perf_counter()
        record = fairy._connection_record
        # Allocations happen before taking the lock (see the module docstring).
        entry = CheckoutEntry(
            now,
            current_request.get(),
            weakref.ref(fairy, _ignore_weakref),
            borrow_site(3) if self.capture_site else None,
            borrow_stack(3) if self.capture_stack else None,
        )
        with self.lock:
            self.pending -= 1
            self.wait.observe(now - started)
            if record in self.open_checkouts:
                return  # the same connection handed out again (SingletonThreadPool)
            self.checkouts += 1
            self.open_checkouts[record] = entry
        request = entry.request
        if request is not None and request.response_started:
            self._count_after_response(request.route)

    def wait_failed(self, started: float, timed_out: bool) -> None:
        waited = perf_counter() - started
        with self.lock:
            self.pending -= 1
            self.wait.observe(waited)
            if timed_out:
                self.timeouts += 1
        if timed_out:
            self._log_timeout(waited)

    def checked_in(self, record: Any) -> None:
        now = perf_counter()
        with self.lock:
            entry = self.open_checkouts.pop(record, None)
            if entry is None:
                return  # a connection we never saw leave (taken before instrumenting)
            self.checkins += 1
            route = route_label(entry.request)
            held = now - entry.started
            reclaimed = entry.fairy_ref() is None
            histogram = self.use.get(route)
            if histogram is None:
                histogram = self.use[route] = Histogram()
            histogram.observe(held)
            if reclaimed:
                self.gc_reclaimed[route] = self.gc_reclaimed.get(route, 0) + 1
        if reclaimed:
            logger.error(
                "poolwatch.gc_reclaimed",
                pool=self.name,
                route=route,
                seconds_held=round(held, 3),
                **describe_site(entry.site),
                **self._stack_field(entry),
            )
        elif entry.leaked:
            logger.info(
                "poolwatch.leak_returned",
                pool=self.name,
                route=route,
                seconds_held=round(held, 3),
                **describe_site(entry.site),
            )

    # -- connection lifecycle (not per checkout) ------------------------------------------------

    def connected(self, seconds: float) -> None:
        with self.lock:
            self.connects += 1
            self.connect_time.observe(seconds)

    def disconnected(self) -> None:
        with self.lock:
            self.disconnects += 1

    def invalidated(self, reason: str) -> None:
        with self.lock:
            self.invalidations[reason] = self.invalidations.get(reason, 0) + 1

    def pre_ping_failed(self, error: str) -> None:
        with self.lock:
            self.pre_ping_failures += 1
        logger.warning("poolwatch.pre_ping_failed", pool=self.name, error=error)

    # -- statements -----------------------------------------------------------------------------

    def query_finished(self, operation: str, seconds: float) -> None:
        with self.lock:
            self.query[operation].observe(seconds)

    def query_failed(self, operation: str, error: str) -> None:
        key = (operation, error)
        with self.lock:
            self.query_errors[key] = self.query_errors.get(key, 0) + 1

    # -- leak sweep -----------------------------------------------------------------------------

    def sweep(self) -> None:
        """Flag checkouts that crossed the leak threshold since the last sweep."""
        threshold = self.leak_threshold
        if threshold <= 0:
            return
        now = perf_counter()
        with self.lock:
            crossed = [
                entry
                for entry in self.open_checkouts.values()
                if not entry.leaked and now - entry.started > threshold
            ]
            for entry in crossed:
                entry.leaked = True
        for entry in crossed:
            route = route_label(entry.request)
            with self.lock:
                self.leaks[route] = self.leaks.get(route, 0) + 1
            logger.warning(
                "poolwatch.leak_detected",
                pool=self.name,
                route=route,
                seconds_held=round(now - entry.started, 3),
                threshold_seconds=threshold,
                **describe_site(entry.site),
                **self._stack_field(entry),
            )

    # -- reading --------------------------------------------------------------------------------

    def live_checkouts(self) -> LiveCheckouts:
        now = perf_counter()
        with self.lock:
            starts = [entry.started for entry in self.open_checkouts.values()]
        if not starts:
            return LiveCheckouts()
        threshold = self.leak_threshold
        ages = [now - s for s in starts]
        leaked = sum(1 for age in ages if age > threshold) if threshold > 0 else 0
        return LiveCheckouts(count=len(ages), oldest_age=max(ages), leaked=leaked)

    def snapshot(self) -> RecorderSnapshot:
        with self.lock:
            snapshot = RecorderSnapshot(
                checkouts=self.checkouts,
                checkins=self.checkins,
                connects=self.connects,
                disconnects=self.disconnects,
                timeouts=self.timeouts,
                pre_ping_failures=self.pre_ping_failures,
                pending=self.pending,
                invalidations=dict(self.invalidations),
                leaks=dict(self.leaks),
                gc_reclaimed=dict(self.gc_reclaimed),
                after_response=dict(self.after_response),
                query_errors=dict(self.query_errors),
                wait=self.wait.cumulative(),
                connect_time=self.connect_time.cumulative(),
                use={route: h.cumulative() for route, h in self.use.items()},
                query={op: h.cumulative() for op, h in self.query.items()},
            )
        snapshot.live = self.live_checkouts()
        return snapshot

    # -- helpers --------------------------------------------------------------------------------

    def _count_after_response(self, route: str) -> None:
        with self.lock:
            self.after_response[route] = self.after_response.get(route, 0) + 1

    def _stack_field(self, entry: CheckoutEntry) -> dict[str, str]:
        if entry.stack is None:
            return {}
        return {"stack": "".join(entry.stack.format())}

    def _log_timeout(self, waited: float) -> None:
        pool = self.pool
        size = _call(pool, "size")
        logger.warning(
            "poolwatch.pool_timeout",
            pool=self.name,
            seconds_waited=round(waited, 3),
            pool_size=size,
            max_overflow=getattr(pool, "_max_overflow", None),
            overflow=max(0, _call(pool, "overflow") or 0),
            checked_out=_call(pool, "checkedout"),
            callers_waiting=self.pending,
        )


def _call(pool: Any, method: str) -> Any:
    function: Callable[[], Any] | None = getattr(pool, method, None)
    return function() if callable(function) else None
