"""The Prometheus collector: reads recorders and live pool state at scrape time.

Gauges come from the pool itself (or, for pools that keep no count, from the table of live
checkouts), never from inc/dec bookkeeping, so they cannot drift or go negative.

A scrape is first read into plain rows (``read_scrape``). Those rows become prometheus_client metric
families for anything that reads the registry, and are written straight to text by
``text_writer`` when poolwatch serves ``/metrics`` itself: building a Sample object per bucket of
every route's histogram is most of what a scrape costs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

from .._log import internal_errors
from .._record.histogram import HistogramCopy
from .._record.recorder import Exemplar as RecordedExemplar
from .._record.recorder import PoolRecorder
from .._record.requests import RequestStats
from .._record.source import PoolState
from .threadpool import read_threadpool


def read_pool_state(recorder: PoolRecorder, live_count: int) -> PoolState:
    """What the pool holds now, as its library counts it (see ``PoolSource.read_state``)."""
    return recorder.source.read_state(live_count)


@dataclass(frozen=True)
class Spec:
    """One metric family of the catalogue: its exposed name, kind, help text and label names."""

    name: str  # as exposed: counters end in _total
    kind: Literal["gauge", "counter", "histogram"]
    help: str
    labels: tuple[str, ...]


def _spec(name: str, kind: Literal["gauge", "counter", "histogram"], help: str, *labels: str) -> Spec:
    return Spec(name, kind, help, labels)


POOL = "pool"
SPECS: dict[str, Spec] = {
    spec.name: spec
    for spec in (
        _spec("poolwatch_connections", "gauge", "Connections checked out (used) or idle in the pool now.", POOL, "state"),
        _spec("poolwatch_connections_max", "gauge", "pool_size + max_overflow (absent for unbounded pools).", POOL),
        _spec("poolwatch_connections_overflow", "gauge", "Connections open beyond pool_size now.", POOL),
        _spec("poolwatch_pending_requests", "gauge", "Callers queued for a free slot now (not those opening or pre-pinging a connection).", POOL),
        _spec("poolwatch_connections_opening", "gauge", "Connections being opened now.", POOL),
        _spec("poolwatch_connections_pinging", "gauge", "Connections being pre-pinged now.", POOL),
        _spec("poolwatch_oldest_checkout_age_seconds", "gauge", "Age of the longest-held checkout now (0 if none).", POOL),
        _spec("poolwatch_leaked_connections", "gauge", "Checkouts held longer than the leak threshold now.", POOL),
        _spec("poolwatch_pool_info", "gauge", "What the pool is; role is a keyed hash of the user name.", POOL, "dialect", "driver", "pool_class", "server", "role"),
        _spec("poolwatch_server_connections_max", "gauge", "The connection limit of this pool's role and database on its server (absent behind a pooler).", POOL),
        _spec("poolwatch_threadpool_threads", "gauge", "AnyIO worker-thread tokens in use (busy) / tasks waiting for one (waiting).", "state"),
        _spec("poolwatch_threadpool_capacity", "gauge", "Total tokens of AnyIO's default thread limiter."),
        _spec("poolwatch_checkouts_total", "counter", "Checkouts.", POOL),
        _spec("poolwatch_checkins_total", "counter", "Checkins.", POOL),
        _spec("poolwatch_connects_total", "counter", "New DBAPI connections opened.", POOL),
        _spec("poolwatch_disconnects_total", "counter", "DBAPI connections closed, by reason.", POOL, "reason"),
        _spec("poolwatch_checkouts_queued_total", "counter", "Checkouts that had to wait for a free slot.", POOL),
        _spec("poolwatch_waits_cancelled_total", "counter", "Callers cancelled while waiting in Pool.connect() (not timeouts).", POOL, "route"),
        _spec("poolwatch_timeouts_total", "counter", "Checkouts that gave up (pool limit reached).", POOL, "route"),
        _spec("poolwatch_connect_errors_total", "counter", "Attempts to open a DBAPI connection that failed.", POOL, "error"),
        _spec("poolwatch_pre_ping_failures_total", "counter", "Pre-ping found a dead connection.", POOL),
        _spec("poolwatch_invalidations_total", "counter", "Invalidated connections by reason.", POOL, "reason"),
        _spec("poolwatch_leaks_total", "counter", "Checkouts that crossed the leak threshold.", POOL, "route"),
        _spec("poolwatch_gc_reclaimed_total", "counter", "Checkouts never returned, reclaimed by the garbage collector.", POOL, "route"),
        _spec("poolwatch_checkouts_after_response_total", "counter", "Checkouts made after the response started (streaming bodies, background tasks).", POOL, "route"),
        _spec("poolwatch_query_errors_total", "counter", "Statements that raised.", POOL, "operation", "error"),
        _spec("poolwatch_internal_errors_total", "counter", "poolwatch's own swallowed failures."),
        _spec("poolwatch_wait_seconds", "histogram", "Time inside Pool.connect(): queueing, plus opening or pre-pinging a connection when that happens.", POOL),
        _spec("poolwatch_use_seconds", "histogram", "Time a connection was held, checkout to checkin.", POOL, "route", "method"),
        _spec("poolwatch_connect_seconds", "histogram", "Time to open a new DBAPI connection.", POOL),
        _spec("poolwatch_query_seconds", "histogram", "Statement execution time.", POOL, "operation"),
        _spec("poolwatch_request_queries", "histogram", "Statements executed per HTTP request.", "route", "method"),
        _spec("poolwatch_held_idle_seconds", "histogram", "Per checkout: hold time minus time inside statements.", POOL, "route"),
        _spec("poolwatch_idle_in_transaction_seconds", "histogram", "Per checkout: the part of held-idle time inside an open transaction.", POOL, "route"),
        _spec("poolwatch_held_after_response_seconds", "histogram", "Per checkout taken before the response started: time held after it started.", POOL, "route"),
    )
}  # fmt: skip


@dataclass
class HistogramRow:
    copy: HistogramCopy
    exemplar: RecordedExemplar | None = None


Value = float | HistogramRow


@dataclass
class Scrape:
    """What one scrape says: for each family, (label values, value) rows in catalogue order."""

    rows: dict[str, list[tuple[tuple[str, ...], Value]]] = field(
        default_factory=lambda: {name: [] for name in SPECS}
    )

    def add(self, name: str, labels: tuple[str, ...], value: Value) -> None:
        self.rows[name].append((labels, value))


# (exported name, recorder): a pool watched under another name in another registry (see
# PoolWatch.add) is the same recorder, named there.
NamedRecorder = tuple[str, PoolRecorder]


def read_scrape(
    recorders: Iterable[NamedRecorder],
    requests: RequestStats | None,
    app_loop: asyncio.AbstractEventLoop | None = None,
) -> Scrape:
    scrape = Scrape()
    for name, recorder in recorders:
        _read_pool(scrape, name, recorder)
    if requests is not None:
        for labels, copy in requests.snapshot().items():
            scrape.add("poolwatch_request_queries", labels, HistogramRow(copy))
    _read_threadpool(scrape, app_loop)
    scrape.add("poolwatch_internal_errors_total", (), float(internal_errors.count))
    return scrape


def _read_pool(scrape: Scrape, name: str, recorder: PoolRecorder) -> None:
    unavailable = getattr(recorder.source, "unavailable", None)
    if unavailable:
        # A pool library that cannot give some families: they are absent, never a made-up zero.
        into = Scrape(rows={family: [] for family in scrape.rows})
        _read_pool_rows(into, name, recorder)
        for family, rows in into.rows.items():
            if family not in unavailable:
                scrape.rows[family].extend(rows)
        return
    _read_pool_rows(scrape, name, recorder)


def _read_pool_rows(scrape: Scrape, name: str, recorder: PoolRecorder) -> None:
    snap = recorder.snapshot()
    state = read_pool_state(recorder, snap.live.count)
    pool = (name,)
    add = scrape.add
    add("poolwatch_connections", (name, "used"), state.used)
    add("poolwatch_connections", (name, "idle"), state.idle)
    if state.max is not None:
        add("poolwatch_connections_max", pool, state.max)
    add("poolwatch_connections_overflow", pool, state.overflow)
    add("poolwatch_pending_requests", pool, max(0, snap.pending))
    add("poolwatch_connections_opening", pool, max(0, recorder.opening))
    add("poolwatch_connections_pinging", pool, max(0, recorder.pinging))
    add("poolwatch_oldest_checkout_age_seconds", pool, snap.live.oldest_age)
    add("poolwatch_leaked_connections", pool, snap.live.leaked)
    pool_class = recorder.source.pool_class
    add(
        "poolwatch_pool_info",
        (name, recorder.dialect, recorder.driver, pool_class, recorder.server, recorder.role),
        1,
    )
    if recorder.server_connections_max is not None:
        add("poolwatch_server_connections_max", pool, recorder.server_connections_max)
    add("poolwatch_checkouts_total", pool, snap.checkouts)
    add("poolwatch_checkins_total", pool, snap.checkins)
    add("poolwatch_connects_total", pool, snap.connects)
    for reason, count in snap.disconnect_reasons.items():
        add("poolwatch_disconnects_total", (name, reason), count)
    add("poolwatch_checkouts_queued_total", pool, snap.checkouts_queued)
    for route, count in snap.waits_cancelled.items():
        add("poolwatch_waits_cancelled_total", (name, route), count)
    for route, count in snap.timeouts.items():
        add("poolwatch_timeouts_total", (name, route), count)
    for error, count in snap.connect_errors.items():
        add("poolwatch_connect_errors_total", (name, error), count)
    add("poolwatch_pre_ping_failures_total", pool, snap.pre_ping_failures)
    for reason, count in snap.invalidations.items():
        add("poolwatch_invalidations_total", (name, reason), count)
    for route, count in snap.leaks.items():
        add("poolwatch_leaks_total", (name, route), count)
    for route, count in snap.gc_reclaimed.items():
        add("poolwatch_gc_reclaimed_total", (name, route), count)
    for route, count in snap.after_response.items():
        add("poolwatch_checkouts_after_response_total", (name, route), count)
    for (operation, error), count in snap.query_errors.items():
        add("poolwatch_query_errors_total", (name, operation, error), count)
    add("poolwatch_wait_seconds", pool, HistogramRow(snap.wait))
    add("poolwatch_connect_seconds", pool, HistogramRow(snap.connect_time))
    # Exemplars are read without the lock: each is one tuple, replaced whole by the hot path.
    use_exemplars = recorder.use_exemplars
    query_exemplars = recorder.query_exemplars
    for key, copy in snap.use.items():
        add("poolwatch_use_seconds", (name, *key), HistogramRow(copy, use_exemplars.get(key)))
    for operation, copy in snap.query.items():
        row = HistogramRow(copy, query_exemplars.get(operation))
        add("poolwatch_query_seconds", (name, operation), row)
    for route, copy in snap.held_idle.items():
        add("poolwatch_held_idle_seconds", (name, route), HistogramRow(copy))
    for route, copy in snap.idle_in_transaction.items():
        add("poolwatch_idle_in_transaction_seconds", (name, route), HistogramRow(copy))
    for route, copy in snap.held_after_response.items():
        add("poolwatch_held_after_response_seconds", (name, route), HistogramRow(copy))


def _read_threadpool(scrape: Scrape, app_loop: asyncio.AbstractEventLoop | None) -> None:
    """The app's worker threads; nothing without an app loop (``watch()`` in a script)."""
    try:
        state = read_threadpool(app_loop)
    except Exception as error:  # an AnyIO that changed shape: the rest of the scrape stands
        internal_errors.record("threadpool", error)
        return
    if state is None:
        return
    scrape.add("poolwatch_threadpool_threads", ("busy",), state.busy)
    scrape.add("poolwatch_threadpool_threads", ("waiting",), state.waiting)
    if state.capacity is not None:
        scrape.add("poolwatch_threadpool_capacity", (), state.capacity)


# Set while poolwatch writes its own families itself, so the registry pass skips them.
writing_directly: ContextVar[bool] = ContextVar("poolwatch_writing_directly", default=False)


class PoolWatchCollector(Collector):
    """Yields every poolwatch metric family for the recorders it is given."""

    def __init__(
        self,
        recorders: Callable[[], Iterable[NamedRecorder]],
        requests: RequestStats | None = None,
        app_loop: Callable[[], asyncio.AbstractEventLoop | None] | None = None,
    ) -> None:
        self._recorders = recorders
        self._requests = requests
        self._app_loop = app_loop

    def read(self) -> Scrape:
        loop = self._app_loop() if self._app_loop is not None else None
        return read_scrape(list(self._recorders()), self._requests, loop)

    def describe(self) -> Iterator[Metric]:
        """Every family of the catalogue, without samples.

        A registry asks this at ``register()`` to refuse a clash of names (a plain
        ``CollectorRegistry()`` checks names only through it) instead of running a full ``collect()``.
        """
        yield from to_metric_families(Scrape())

    def collect(self) -> Iterator[Metric]:
        if writing_directly.get():
            return
        try:
            scrape = self.read()
        except Exception as error:
            internal_errors.record("collect", error)
            scrape = Scrape()
            scrape.add("poolwatch_internal_errors_total", (), float(internal_errors.count))
        yield from to_metric_families(scrape)


def to_metric_families(scrape: Scrape) -> Iterator[Metric]:
    for name, rows in scrape.rows.items():
        spec = SPECS[name]
        labels = list(spec.labels)
        family: Metric
        if spec.kind == "histogram":
            histogram = HistogramMetricFamily(name, spec.help, labels=labels, unit="")
            for label_values, value in rows:
                assert isinstance(value, HistogramRow)
                buckets, total = value.copy.cumulative()
                if value.exemplar is not None:
                    buckets = with_exemplar(buckets, value.exemplar)
                histogram.add_metric(list(label_values), buckets, total)
            family = histogram
        else:
            kind = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
            scalar = kind(name, spec.help, labels=labels)
            for label_values, value in rows:
                assert not isinstance(value, HistogramRow)
                scalar.add_metric(list(label_values), value)
            family = scalar
        yield family


def with_exemplar(buckets: list[tuple[str, float]], exemplar: RecordedExemplar) -> list[Any]:
    """The buckets with ``exemplar`` attached to the first bucket its value falls into.

    OpenMetrics allows one exemplar per bucket; the text format ignores them.
    """
    trace_id, value, timestamp = exemplar
    attached: list[Any] = list(buckets)
    for index, (bound, count) in enumerate(buckets):
        if value <= float(bound):
            attached[index] = (bound, count, Exemplar({"trace_id": trace_id}, value, timestamp))
            break
    return attached
