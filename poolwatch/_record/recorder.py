"""Per-pool recorder: counts, bucket histograms and the table of live checkouts.

Everything here is written on the hot path, so it is plain Python objects: no prometheus_client
objects, no label tuples built per event, no stack walks beyond the cached borrow-site lookup. The
collector reads a snapshot at scrape time.

No lock on the checkout and checkin path. Every count there is a ``+=`` statement on an int (a
histogram bucket, or one of the recorder's own two counts), and the sums a ``+=`` on a float: CPython
does not switch threads or start a collection inside one (see ``histogram``). The table of checkouts
is written with ``dict.setdefault`` and taken with ``dict.pop``, each one atomic, so the pop decides
which checkin counts. An ``RLock`` serialises what is rare: the keyed counters (leaks, timeouts,
errors), claiming a leak, making a route's histograms.

Garbage-collector re-entry. The collector may finalize a lost connection at any allocation (3.11)
or between bytecodes (3.12+), on whatever thread allocated, and SQLAlchemy then checks it in on that
thread: the checkin hook runs *inside* whatever that thread was doing, possibly while it holds this
recorder's lock. So:

- the lock is re-entrant (an ``RLock``): a nested checkin never waits for its own thread;
- readers never iterate a container the checkin path changes: they take a C-level copy first
  (``list(d)``, ``list(d.values())``: the only allocation in those calls happens before the copy
  starts), and the keyed counters only ever gain keys, so keys and values copied one after the other
  still pair up by position;
- a nested writer finishes its own few statements before the interrupted code resumes, and none of
  the interrupted sections splits a read-modify-write across a call, so no count is lost.
tests/test_gc_reentry.py forces a collection at every allocation of each reading path to prove it.
"""

from __future__ import annotations

import contextvars
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import CodeType
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from .context import NO_REQUEST, NO_REQUEST_KEY, RequestContext, current_request, route_label
from .events import (
    Event,
    GcReclaimed,
    HeldIdle,
    IdleInTransaction,
    LeakDetected,
    LeakReturned,
    PoolTimeout,
    PrePingFailed,
    describe_site,
    emit,
)
from .histogram import Histogram, HistogramCopy

if TYPE_CHECKING:
    from .._settings import PoolWatchSettings
    from .source import PoolSource

OPERATIONS = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRANSACTION", "DDL", "OTHER")
# Why a DBAPI connection was closed (poolwatch_disconnects_total's reason label).
DISCONNECT_REASONS = ("recycled", "invalidated", "overflow", "reset_failed", "disposed", "other")

perf_counter = time.perf_counter

# (trace id as 32 hex digits, observed value, unix timestamp)
Exemplar = tuple[str, float, float]

# (route, method): the key of the hold-time histograms.
RouteKey = tuple[str, str]


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
    # The key of the checkout table, kept here so readers can iterate a copy of the table's values
    # alone (see the module docstring): SQLAlchemy's connection record, or for a pool that shares
    # one record among checkouts (StaticPool, SingletonThreadPool) the id of the checkout's proxy.
    record: Any
    # The contextvars at checkout (structlog's bound request id, for one), for events about this
    # checkout that are logged later from another thread.
    context: contextvars.Context | None
    # [statements run, seconds inside them, seconds idle inside an open transaction, the time the
    # open transaction's current idle stretch began (0.0: none open), seconds inside statements at
    # that time] on this checkout so far: the statement timer adds to it while the connection is
    # out (one thread uses a connection at a time). See ``_capture.transactions``.
    usage: list[float]


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
    timeouts: dict[str, int]
    connect_errors: dict[str, int]
    pre_ping_failures: int
    pending: int
    invalidations: dict[str, int]
    leaks: dict[str, int]
    gc_reclaimed: dict[str, int]
    after_response: dict[str, int]
    query_errors: dict[tuple[str, str], int]
    wait: HistogramCopy
    connect_time: HistogramCopy
    use: dict[RouteKey, HistogramCopy]
    held_idle: dict[str, HistogramCopy]
    query: dict[str, HistogramCopy]
    live: LiveCheckouts = field(default_factory=LiveCheckouts)
    # Issue 27: closings by reason, queued checkouts, cancelled waits, idle in transaction, held
    # after the response started (defaults, so a snapshot made elsewhere needs none of them).
    disconnect_reasons: dict[str, int] = field(default_factory=dict)
    checkouts_queued: int = 0
    waits_cancelled: dict[str, int] = field(default_factory=dict)
    idle_in_transaction: dict[str, HistogramCopy] = field(default_factory=dict)
    held_after_response: dict[str, HistogramCopy] = field(default_factory=dict)


class PoolRecorder:
    """Counts for one named pool (one engine, or one asyncpg or psycopg_pool pool), across
    ``engine.dispose()``."""

    def __init__(self, name: str, source: PoolSource, settings: PoolWatchSettings) -> None:
        self.name = name
        # The pool's library seen through one interface (``source.PoolSource``): labels, state, probe.
        self.source = source
        self.leak_threshold = settings.leak_threshold_seconds
        self.capture_site = settings.leak_threshold_seconds > 0
        self.capture_stack = settings.leak_capture_stack and self.capture_site
        self.held_idle_threshold = settings.held_idle_seconds
        self.idle_in_transaction_threshold = settings.idle_in_transaction_seconds
        self.held_during_response_threshold = settings.held_during_response_seconds
        self.timeout_note = settings.timeout_note
        self.dialect = source.dialect
        self.driver = source.driver
        self.server = source.server
        # A keyed hash of the URL's user name (``_record.server.role_tag``): pools of one role on
        # one server share it, so the fleet's capacity is summed per role, and it names nobody.
        self.role = source.role
        # The connection limit of this pool's role and database on its server (see
        # ``_capture.capacity``): the setting's number if given, else read from the server by
        # ``ensure_read`` (None until read, behind a pooler, for SQLite, when unreadable, and when
        # the setting is off). ``server_limit_read_at`` is the monotonic time of the last read that
        # succeeded; ``server_limit_readable`` is False when the setting gave a number or "off".
        configured_limit = settings.server_connections_max
        self.server_connections_max: int | None = (
            configured_limit if isinstance(configured_limit, int) else None
        )
        self.server_limit_read_at: float | None = None
        self.server_limit_readable = configured_limit is None
        # Re-entrant: the garbage collector may check a connection in on a thread that holds it.
        self.lock = threading.RLock()
        # Callers inside Pool.connect now = started - the wait histogram's count (every call that
        # ends, well or not, is observed there once). Inside connect a caller may be queued for a
        # slot, opening a connection or pre-pinging one: each of those is counted on its own below.
        self.waits_started = 0
        # Callers blocked in the pool's queue for a free slot now (``pending``); connections being
        # opened now; pre-pings in flight now. Each is a ``+= 1`` before and a ``-= 1`` after.
        self.queued = 0
        self.opening = 0
        self.pinging = 0
        # Counted when the checkout table takes the entry (not when SingletonThreadPool hands out
        # a connection that is already out).
        self.checkouts = 0
        # Checkouts in the table now, and the largest number of them, and of queued callers, since
        # the last ``take_peaks()``: compared on every change, so a burst shorter than any sampling
        # interval still shows (the sizing verdict needs the exact peak).
        self.in_use = 0
        self.peak_in_use = 0
        self.peak_queued = 0

        self.connects = 0
        self.disconnects = 0
        self.timeouts: dict[str, int] = {NO_REQUEST: 0}
        self.connect_errors: dict[str, int] = {}
        self.pre_ping_failures = 0
        self.invalidations: dict[str, int] = {}
        self.leaks: dict[str, int] = {NO_REQUEST: 0}
        self.gc_reclaimed: dict[str, int] = {NO_REQUEST: 0}
        self.after_response: dict[str, int] = {}
        self.query_errors: dict[tuple[str, str], int] = {}
        self.wait = Histogram()
        self.connect_time = Histogram()
        self.use: dict[RouteKey, Histogram] = {NO_REQUEST_KEY: Histogram()}
        self.held_idle: dict[str, Histogram] = {NO_REQUEST: Histogram()}
        # Of held-idle time, the part inside an open transaction, per checkout; and for checkouts
        # taken before their response started, the time held after it started.
        self.idle_in_transaction: dict[str, Histogram] = {NO_REQUEST: Histogram()}
        self.held_after_response: dict[str, Histogram] = {NO_REQUEST: Histogram()}
        # Checkouts that waited in the queue for a free slot; callers cancelled inside
        # Pool.connect (a client that went away, not a timeout); closings by reason.
        self.checkouts_queued = 0
        self.waits_cancelled: dict[str, int] = {NO_REQUEST: 0}
        self.disconnect_reasons: dict[str, int] = dict.fromkeys(DISCONNECT_REASONS, 0)
        # The checkin path's one lookup: (route, method) -> (its hold-time histogram, its route's
        # held-idle and idle-in-transaction histograms).
        self.histograms_by_key: dict[RouteKey, tuple[Histogram, Histogram, Histogram]] = {
            NO_REQUEST_KEY: (
                self.use[NO_REQUEST_KEY],
                self.held_idle[NO_REQUEST],
                self.idle_in_transaction[NO_REQUEST],
            )
        }
        self.query: dict[str, Histogram] = {op: Histogram() for op in OPERATIONS}
        # Keyed by SQLAlchemy's connection record, which outlives the checkout and is hashable.
        self.open_checkouts: dict[Any, CheckoutEntry] = {}
        # With tracing on: the latest exemplar per series, (trace_id hex, value, unix time), keyed
        # by (route, method) (use_seconds) and by operation (query_seconds). Written on the hot path only
        # when a span is active; read by the collector for OpenMetrics output.
        self.tracing = settings.tracing
        self.use_exemplars: dict[RouteKey, Exemplar] = {}
        self.query_exemplars: dict[str, Exemplar] = {}
        # id(DBAPI connection) -> the driver's error class of its failed pre-ping, until the
        # invalidation that follows (see pre_ping_failed).
        self.failed_pings: dict[int, str] = {}
        # Records whose checkout the sweeper flagged; checked at checkin only while non-empty.
        self.leaked_records: set[Any] = set()

    @property
    def engine(self) -> Any:
        """SQLAlchemy's Engine of a SQLAlchemy pool (None once collected, and for other pools)."""
        return self.source.engine

    @property
    def pool(self) -> Any:
        """The library's pool object (None once collected)."""
        return self.source.pool

    # -- hot path: checkout and checkin ---------------------------------------------------------

    @property
    def pending(self) -> int:
        """Callers queued for a free slot now: never a caller that is opening a connection or
        pre-pinging one (those are ``opening`` and ``pinging``)."""
        return max(0, self.queued)

    @property
    def in_connect(self) -> int:
        """Callers inside ``Pool.connect`` now, for whatever reason."""
        # Read the finished calls first: a caller that starts in between only makes this larger.
        finished = self.wait.count
        return max(0, self.waits_started - finished)

    def take_peaks(self) -> tuple[int, int]:
        """The most checkouts out at once and the most callers queued at once since the last call,
        and the next interval starts from the values now.

        Exact without a lock: each swap below is loads and stores with no call between them, so no
        thread switch (and no checkin nested by the garbage collector) comes in the middle, and the
        hot path's compare-and-store is equally whole. Meant for one consumer (the interval sampler):
        two would split the peaks between them.
        """
        peak_in_use, self.peak_in_use = self.peak_in_use, self.in_use
        peak_queued, self.peak_queued = self.peak_queued, self.queued
        return peak_in_use, peak_queued

    @property
    def checkins(self) -> int:
        """Every counted checkin is one observation of a hold-time histogram."""
        return sum(histogram.count for histogram in list(self.use.values()))

    @property
    def checkin_progress(self) -> float:
        """A number that grows with every checkin (the seconds held, summed): cheaper to read
        than ``checkins``, which reads every bucket of every route's histogram."""
        return sum(histogram.total for histogram in list(self.use.values()))

    def wait_failed(self, started: float, timed_out: bool) -> None:
        waited = perf_counter() - started
        try:
            if timed_out:
                route = route_label(current_request.get())
                with self.lock:
                    bump(self.timeouts, route)
                # Counted among the waiting until logged: the event reports who waited, this
                # caller included.
                self._report_timeout(waited, route)
        finally:
            self.wait.observe(waited)

    def histograms_for(self, key: RouteKey) -> tuple[Histogram, Histogram, Histogram]:
        """The hold-time, held-idle and idle-in-transaction histograms of (route, method), made on
        first use."""
        with self.lock:
            found = self.histograms_by_key.get(key)
            if found is None:
                route = key[0]
                use = self.use.get(key)
                if use is None:
                    use = self.use[key] = Histogram()
                idle = self.held_idle.get(route)
                if idle is None:
                    idle = self.held_idle[route] = Histogram()
                in_transaction = self.idle_in_transaction.get(route)
                if in_transaction is None:
                    in_transaction = self.idle_in_transaction[route] = Histogram()
                found = self.histograms_by_key[key] = (use, idle, in_transaction)
            return found

    def held_after_response_for(self, route: str) -> Histogram:
        """The held-after-response histogram of ``route``, made on first use."""
        with self.lock:
            found = self.held_after_response.get(route)
            if found is None:
                found = self.held_after_response[route] = Histogram()
            return found

    def returned_notably(
        self, entry: CheckoutEntry, key: RouteKey, held: float, idle: float, idle_in_transaction: float = 0.0
    ) -> None:
        """A checkin worth a closer look: the garbage collector returned it, it was held past the
        leak threshold (flagged by the sweeper while out, or crossed since its last pass), or it was
        held idle past the held-idle threshold.

        Counting a leak here too means every checkout held too long is counted exactly once,
        however short the time between crossing the threshold and being returned: the sweeper
        claims a checkout only while it is still in the table, and the checkin path took it out
        of the table (one atomic ``dict.pop``) before asking here whether it was claimed.
        """
        route = key[0]
        fairy_ref = entry.fairy_ref
        reclaimed = fairy_ref is not None and fairy_ref() is None
        record = entry.record
        with self.lock:
            flagged = record in self.leaked_records
            if flagged:
                self.leaked_records.discard(record)
            late_leak = not flagged and 0 < self.leak_threshold < held
            if reclaimed:
                bump(self.gc_reclaimed, route)
            if late_leak:
                bump(self.leaks, route)
        if late_leak:
            self._report_leak(entry, route, held)
        if reclaimed:
            site, function = describe_site(entry.site)
            _emit_in(entry, GcReclaimed(self.name, route, held, site, function, _stack_text(entry)))
        elif flagged or late_leak:
            site, function = describe_site(entry.site)
            _emit_in(entry, LeakReturned(self.name, route, held, site, function))
        if 0 < self.held_idle_threshold < idle:
            site, function = describe_site(entry.site)
            statements = int(entry.usage[0])
            held_idle = HeldIdle(
                self.name, route, key[1], held, idle, self.held_idle_threshold, statements, site, function
            )
            _emit_in(entry, held_idle)
        if 0 < self.idle_in_transaction_threshold < idle_in_transaction:
            site, function = describe_site(entry.site)
            statements = int(entry.usage[0])
            in_transaction = IdleInTransaction(
                self.name, route, key[1], held, idle_in_transaction,
                self.idle_in_transaction_threshold, statements, site, function,
            )  # fmt: skip
            _emit_in(entry, in_transaction)

    # -- connection lifecycle (not per checkout) ------------------------------------------------

    def connected(self, seconds: float) -> None:
        with self.lock:
            self.connects += 1
        self.connect_time.observe(seconds)

    def connect_failed(self, error: str) -> None:
        with self.lock:
            bump(self.connect_errors, error)

    def disconnected(self, reason: str = "other") -> None:
        with self.lock:
            self.disconnects += 1
            bump(self.disconnect_reasons, reason if reason in DISCONNECT_REASONS else "other")

    def wait_cancelled(self, route: str) -> None:
        with self.lock:
            bump(self.waits_cancelled, route)

    def invalidated(self, reason: str) -> None:
        with self.lock:
            bump(self.invalidations, reason)

    def pre_ping_failed(self, error: str, dbapi_connection: object) -> None:
        with self.lock:
            self.pre_ping_failures += 1
        # SQLAlchemy swallows the driver's error of a failed ping and invalidates the connection
        # with its own InvalidatePoolError; the invalidation that follows on this connection takes
        # the driver's class as its reason from here (``invalidation_reason_for``).
        if len(self.failed_pings) > 1000:  # pings that raised instead: never invalidated
            self.failed_pings.clear()
        self.failed_pings[id(dbapi_connection)] = error
        emit(PrePingFailed(self.name, error))

    def invalidation_reason_for(self, dbapi_connection: object, reason: str) -> str:
        """``reason``, or the driver's error class when it is SQLAlchemy's stand-in for a ping
        that failed on this very connection."""
        failed_ping = self.failed_pings.pop(id(dbapi_connection), None)
        if reason == "InvalidatePoolError" and failed_ping is not None:
            return failed_ping
        return reason

    # -- statements -----------------------------------------------------------------------------

    def query_failed(self, operation: str, error: str) -> None:
        with self.lock:
            bump(self.query_errors, (operation, error))

    # -- leak sweep -----------------------------------------------------------------------------

    def sweep(self) -> None:
        """Flag and count checkouts that crossed the leak threshold since the last sweep."""
        threshold = self.leak_threshold
        if threshold <= 0:
            return
        now = perf_counter()
        open_checkouts = self.open_checkouts
        leaked = self.leaked_records
        crossed: list[CheckoutEntry] = []
        with self.lock:
            for entry in list(open_checkouts.values()):
                record = entry[5]
                # Claimed only while this very checkout is still out, with no call between the
                # test and the claim: a checkin (on another thread, or nested here by the garbage
                # collector) either finds it claimed or has already counted it itself.
                if (
                    now - entry[0] > threshold
                    and record not in leaked
                    and record in open_checkouts
                    and open_checkouts[record] is entry
                ):
                    leaked.add(record)
                    crossed.append(entry)
        for entry in crossed:
            entry = CheckoutEntry(*entry)
            route = route_label(entry.request)
            with self.lock:
                bump(self.leaks, route)
            self._report_leak(entry, route, now - entry.started)

    def _report_leak(self, entry: CheckoutEntry, route: str, held: float) -> None:
        site, function = describe_site(entry.site)
        statements, in_statements = entry.usage[0], entry.usage[1]
        leak = LeakDetected(
            self.name,
            route,
            held,
            self.leak_threshold,
            site,
            function,
            _stack_text(entry),
            seconds_in_statements=in_statements,
            statements=int(statements),
        )
        _emit_in(entry, leak)

    # -- reading --------------------------------------------------------------------------------

    def live_checkouts(self) -> LiveCheckouts:
        with self.lock:
            starts = [entry[0] for entry in list(self.open_checkouts.values())]
        # The clock is read after the copy: every entry in it started before now, so no age is
        # ever negative (read before, a checkout made meanwhile had one).
        now = perf_counter()
        if not starts:
            return LiveCheckouts()
        threshold = self.leak_threshold
        ages = [now - s for s in starts]
        leaked = sum(1 for age in ages if age > threshold) if threshold > 0 else 0
        return LiveCheckouts(count=len(ages), oldest_age=max(ages), leaked=leaked)

    def snapshot(self) -> RecorderSnapshot:
        with self.lock:
            # Checkins first, from the hold-time copies (one observation per checkin), and
            # checkouts after: a checkin follows its checkout, so a scrape never shows more
            # checkins than checkouts.
            use = copy_histograms(self.use)
            checkins = sum([sum(copy.counts) for copy in use.values()])
            snapshot = RecorderSnapshot(
                checkouts=self.checkouts,
                checkins=checkins,
                connects=self.connects,
                disconnects=self.disconnects,
                timeouts=copy_counts(self.timeouts),
                connect_errors=copy_counts(self.connect_errors),
                pre_ping_failures=self.pre_ping_failures,
                pending=self.pending,
                invalidations=copy_counts(self.invalidations),
                leaks=copy_counts(self.leaks),
                gc_reclaimed=copy_counts(self.gc_reclaimed),
                after_response=copy_counts(self.after_response),
                query_errors=copy_counts(self.query_errors),
                wait=self.wait.copy(),
                connect_time=self.connect_time.copy(),
                use=use,
                held_idle=copy_histograms(self.held_idle),
                query=copy_histograms(self.query),
                disconnect_reasons=copy_counts(self.disconnect_reasons),
                checkouts_queued=self.checkouts_queued,
                waits_cancelled=copy_counts(self.waits_cancelled),
                idle_in_transaction=copy_histograms(self.idle_in_transaction),
                held_after_response=copy_histograms(self.held_after_response),
            )
        snapshot.live = self.live_checkouts()
        return snapshot

    # -- helpers --------------------------------------------------------------------------------

    def count_after_response(self, route: str) -> None:
        with self.lock:
            bump(self.after_response, route)

    def _report_timeout(self, waited: float, route: str) -> None:
        pool = self.pool
        timeout = PoolTimeout(
            pool=self.name,
            seconds_waited=waited,
            pool_size=_call(pool, "size"),
            max_overflow=getattr(pool, "_max_overflow", None),
            overflow=max(0, _call(pool, "overflow") or 0),
            checked_out=_call(pool, "checkedout"),
            # This caller has left the queue by now; it waited too.
            callers_waiting=self.pending + 1,
            route=route,
        )
        emit(timeout)


K = TypeVar("K")


def bump(counts: dict[K, int], key: K) -> None:
    """``counts[key] += 1``, in two steps with no call inside either: a checkin that the garbage
    collector nests here finds the count whole, and its own increment is never lost."""
    if key not in counts:
        counts[key] = 0
    counts[key] += 1


def copy_counts(counts: dict[K, int]) -> dict[K, int]:
    """A copy safe against a nested checkin adding a key meanwhile (see the module docstring)."""
    return dict(zip(list(counts), list(counts.values()), strict=False))


def copy_histograms(histograms: dict[K, Histogram]) -> dict[K, HistogramCopy]:
    return {
        key: histogram.copy()
        for key, histogram in zip(list(histograms), list(histograms.values()), strict=False)
    }


def _emit_in(entry: CheckoutEntry, event: Event) -> None:
    """Emit inside the contextvars of the checkout (structlog's bound request id, say), a copy of
    them: two threads may report one entry."""
    if entry.context is None:
        emit(event)
    else:
        entry.context.copy().run(emit, event)


def _stack_text(entry: CheckoutEntry) -> str | None:
    return None if entry.stack is None else "".join(entry.stack.format())


def _call(pool: Any, method: str) -> Any:
    function: Callable[[], Any] | None = getattr(pool, method, None)
    return function() if callable(function) else None
