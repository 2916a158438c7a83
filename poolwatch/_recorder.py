"""Per-pool recorder: plain counters, bucket arrays and the table of live checkouts.

Everything here is written on the hot path, so it is plain Python objects under one lock per pool:
no prometheus_client objects, no label tuples built per event, no stack walks beyond the cached
borrow-site lookup. The collector reads a snapshot at scrape time.

Exact counts under threads need the lock, but a lock costs as much here as half of SQLAlchemy's own
checkout, so the hot path takes it once per checkout and once per checkin (plain acquire/release, not
a ``with`` block) and the waiting-callers gauge uses two atomic ``itertools.count`` tickers instead.

The garbage collector may return a lost connection (and so call ``checked_in``) from any allocation
of a tracked object, even one made while this thread holds the lock. Nothing that allocates such an
object runs while the lock is held, so that re-entry can never find the lock taken by itself.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import CodeType
from typing import TYPE_CHECKING, Any, NamedTuple

from ._borrow_site import describe_site
from ._context import NO_REQUEST, RequestContext, route_label
from ._histogram import Histogram, HistogramCopy
from ._log import logger

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import Pool

    from ._settings import PoolWatchSettings

OPERATIONS = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRANSACTION", "DDL", "OTHER")

perf_counter = time.perf_counter

# (trace id as 32 hex digits, observed value, unix timestamp)
Exemplar = tuple[str, float, float]


def ticker_value(ticker: itertools.count[int]) -> int:
    """How many times ``next()`` was called on an ``itertools.count()`` started at 0.

    ``next(count)`` is a single atomic C call, which makes it the cheapest exact counter shared
    between threads; its repr, ``count(N)``, is the only public way to read it without advancing.
    """
    return int(repr(ticker)[6:-1])


class CheckoutEntry(NamedTuple):
    """One connection out of the pool right now.

    Built on every checkout, so the hot path makes it as a plain tuple (a NamedTuple's constructor
    is a Python call); this class names the fields for every other reader.
    """

    started: float
    request: RequestContext | None
    # SQLAlchemy's own weakref to the connection proxy: dead at checkin means the garbage
    # collector, not the application, returned the connection.
    fairy_ref: weakref.ref[Any] | None
    site: tuple[CodeType, int] | None
    stack: traceback.StackSummary | None


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
    wait: HistogramCopy
    connect_time: HistogramCopy
    use: dict[str, HistogramCopy]
    query: dict[str, HistogramCopy]
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
        self.lock = threading.Lock()
        self._acquire = self.lock.acquire
        self._release = self.lock.release
        # Callers inside Pool.connect now = started - finished; both are atomic tickers.
        self.waits_started = itertools.count()
        self.waits_finished = itertools.count()

        self.checkouts = 0
        self.checkins = 0
        self.connects = 0
        self.disconnects = 0
        self.timeouts = 0
        self.pre_ping_failures = 0
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
        # With tracing on: the latest exemplar per series, (trace_id hex, value, unix time), keyed
        # by route (use_seconds) and by operation (query_seconds). Written on the hot path only
        # when a span is active; read by the collector for OpenMetrics output.
        self.tracing = settings.tracing
        self.use_exemplars: dict[str, Exemplar] = {}
        self.query_exemplars: dict[str, Exemplar] = {}
        # Records whose checkout the sweeper flagged; checked at checkin only while non-empty.
        self.leaked_records: set[Any] = set()

    @property
    def engine(self) -> Engine | None:
        return self._engine_ref()

    @property
    def pool(self) -> Pool | None:
        engine = self._engine_ref()
        return None if engine is None else engine.pool

    # -- hot path: checkout and checkin ---------------------------------------------------------

    @property
    def pending(self) -> int:
        # Read finished first: a caller that starts in between can only make this larger.
        finished = ticker_value(self.waits_finished)
        return max(0, ticker_value(self.waits_started) - finished)

    def wait_failed(self, started: float, timed_out: bool) -> None:
        waited = perf_counter() - started
        with self.lock:
            self.wait.observe(waited)
            if timed_out:
                self.timeouts += 1
        # Counted among the waiting until logged: the event reports who waited, this caller included.
        try:
            if timed_out:
                self._log_timeout(waited)
        finally:
            next(self.waits_finished)

    def returned_notably(self, entry: CheckoutEntry, route: str, held: float, reclaimed: bool) -> None:
        """A checkin worth telling someone about: a flagged leak came back, or the GC returned it."""
        if reclaimed:
            logger.error(
                "poolwatch.gc_reclaimed",
                pool=self.name,
                route=route,
                seconds_held=round(held, 3),
                **describe_site(entry.site),
                **self._stack_field(entry),
            )
        else:
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
                (record, CheckoutEntry(*entry))
                for record, entry in self.open_checkouts.items()
                if now - entry[0] > threshold and record not in self.leaked_records
            ]
            self.leaked_records.update(record for record, _ in crossed)
        for _, entry in crossed:
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
            starts = [entry[0] for entry in self.open_checkouts.values()]
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
                wait=self.wait.copy(),
                connect_time=self.connect_time.copy(),
                use={route: h.copy() for route, h in self.use.items()},
                query={op: h.copy() for op, h in self.query.items()},
            )
        snapshot.live = self.live_checkouts()
        return snapshot

    # -- helpers --------------------------------------------------------------------------------

    def count_after_response(self, route: str) -> None:
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
