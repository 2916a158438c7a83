"""The Prometheus collector: reads recorders and live pool state at scrape time.

Gauges come from the pool itself (or, for pools that keep no count, from the table of live
checkouts), never from inc/dec bookkeeping, so they cannot drift or go negative.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

from ._log import internal_errors
from ._recorder import Exemplar as RecordedExemplar
from ._recorder import PoolRecorder, RecorderSnapshot
from ._requests import RequestStats

Buckets = tuple[list[tuple[str, float]], float]


@dataclass
class PoolState:
    used: int
    idle: int
    overflow: int
    max: int | None


def read_pool_state(recorder: PoolRecorder, live_count: int) -> PoolState:
    """What the pool holds now. QueuePool-like pools count for themselves; others do not."""
    pool: Any = recorder.pool
    checkedout = getattr(pool, "checkedout", None)
    if pool is None or not callable(checkedout):
        # NullPool, StaticPool, SingletonThreadPool: our own table of checkouts is the truth.
        return PoolState(used=live_count, idle=0, overflow=0, max=None)
    size = pool.size()
    max_overflow = getattr(pool, "_max_overflow", -1)
    bounded = size > 0 and max_overflow > -1
    return PoolState(
        used=max(0, checkedout()),
        idle=max(0, pool.checkedin()),
        overflow=max(0, pool.overflow()),
        max=size + max_overflow if bounded else None,
    )


class PoolWatchCollector(Collector):
    """Yields every poolwatch metric family for the recorders it is given."""

    def __init__(
        self,
        recorders: Callable[[], Iterable[PoolRecorder]],
        requests: RequestStats | None = None,
    ) -> None:
        self._recorders = recorders
        self._requests = requests

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect()
        except Exception as error:
            internal_errors.record("collect", error)
            yield _counter("poolwatch_internal_errors_total", "poolwatch's own swallowed failures", [])

    def _collect(self) -> Iterator[Metric]:
        families = _Families()
        for recorder in list(self._recorders()):
            snap = recorder.snapshot()
            families.add_pool(recorder, snap, read_pool_state(recorder, snap.live.count))
        if self._requests is not None:
            for route, buckets in self._requests.snapshot().items():
                families.request_queries.add_metric([route], *buckets)
        families.internal_errors.add_metric([], internal_errors.count)
        yield from families.all()


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


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _histogram(name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=labels, unit="")


class _Families:
    """One family object per metric name, filled pool by pool."""

    def __init__(self) -> None:
        p = ["pool"]
        self.connections = _gauge(
            "poolwatch_connections",
            "Connections checked out (used) or idle in the pool now.",
            ["pool", "state"],
        )
        self.connections_max = _gauge(
            "poolwatch_connections_max", "pool_size + max_overflow (absent for unbounded pools).", p
        )
        self.overflow = _gauge("poolwatch_connections_overflow", "Connections open beyond pool_size now.", p)
        self.pending = _gauge("poolwatch_pending_requests", "Callers waiting for a connection now.", p)
        self.oldest = _gauge(
            "poolwatch_oldest_checkout_age_seconds",
            "Age of the longest-held checkout now (0 if none).",
            p,
        )
        self.leaked = _gauge(
            "poolwatch_leaked_connections", "Checkouts held longer than the leak threshold now.", p
        )
        self.info = _gauge(
            "poolwatch_pool_info", "What the pool is.", ["pool", "dialect", "driver", "pool_class"]
        )
        self.checkouts = _counter("poolwatch_checkouts_total", "Checkouts.", p)
        self.checkins = _counter("poolwatch_checkins_total", "Checkins.", p)
        self.connects = _counter("poolwatch_connects_total", "New DBAPI connections opened.", p)
        self.disconnects = _counter("poolwatch_disconnects_total", "DBAPI connections closed.", p)
        self.timeouts = _counter(
            "poolwatch_timeouts_total", "Checkouts that gave up (pool limit reached).", p
        )
        self.pre_ping = _counter("poolwatch_pre_ping_failures_total", "Pre-ping found a dead connection.", p)
        self.invalidations = _counter(
            "poolwatch_invalidations_total", "Invalidated connections by reason.", ["pool", "reason"]
        )
        self.leaks = _counter(
            "poolwatch_leaks_total", "Checkouts that crossed the leak threshold.", ["pool", "route"]
        )
        self.gc_reclaimed = _counter(
            "poolwatch_gc_reclaimed_total",
            "Checkouts never returned, reclaimed by the garbage collector.",
            ["pool", "route"],
        )
        self.after_response = _counter(
            "poolwatch_checkouts_after_response_total",
            "Checkouts made after the response started (streaming bodies, background tasks).",
            ["pool", "route"],
        )
        self.query_errors = _counter(
            "poolwatch_query_errors_total", "Statements that raised.", ["pool", "operation", "error"]
        )
        self.internal_errors = _counter(
            "poolwatch_internal_errors_total", "poolwatch's own swallowed failures.", []
        )
        self.wait = _histogram("poolwatch_wait_seconds", "Time spent waiting for a checkout.", p)
        self.use = _histogram(
            "poolwatch_use_seconds",
            "Time a connection was held, checkout to checkin.",
            ["pool", "route"],
        )
        self.connect = _histogram("poolwatch_connect_seconds", "Time to open a new DBAPI connection.", p)
        self.query = _histogram("poolwatch_query_seconds", "Statement execution time.", ["pool", "operation"])
        self.request_queries = _histogram(
            "poolwatch_request_queries", "Statements executed per HTTP request.", ["route"]
        )

    def add_pool(self, recorder: PoolRecorder, snap: RecorderSnapshot, state: PoolState) -> None:
        name = recorder.name
        pool = recorder.pool
        self.connections.add_metric([name, "used"], state.used)
        self.connections.add_metric([name, "idle"], state.idle)
        if state.max is not None:
            self.connections_max.add_metric([name], state.max)
        self.overflow.add_metric([name], state.overflow)
        self.pending.add_metric([name], max(0, snap.pending))
        self.oldest.add_metric([name], snap.live.oldest_age)
        self.leaked.add_metric([name], snap.live.leaked)
        pool_class = type(pool).__name__ if pool is not None else "unknown"
        self.info.add_metric([name, recorder.dialect, recorder.driver, pool_class], 1)
        self.checkouts.add_metric([name], snap.checkouts)
        self.checkins.add_metric([name], snap.checkins)
        self.connects.add_metric([name], snap.connects)
        self.disconnects.add_metric([name], snap.disconnects)
        self.timeouts.add_metric([name], snap.timeouts)
        self.pre_ping.add_metric([name], snap.pre_ping_failures)
        for reason, count in snap.invalidations.items():
            self.invalidations.add_metric([name, reason], count)
        for route, count in snap.leaks.items():
            self.leaks.add_metric([name, route], count)
        for route, count in snap.gc_reclaimed.items():
            self.gc_reclaimed.add_metric([name, route], count)
        for route, count in snap.after_response.items():
            self.after_response.add_metric([name, route], count)
        for (operation, error), count in snap.query_errors.items():
            self.query_errors.add_metric([name, operation, error], count)
        self.wait.add_metric([name], *snap.wait)
        self.connect.add_metric([name], *snap.connect_time)
        # Exemplars are read without the lock: each is one tuple, replaced whole by the hot path.
        use_exemplars = recorder.use_exemplars
        query_exemplars = recorder.query_exemplars
        for route, (buckets, total) in snap.use.items():
            exemplar = use_exemplars.get(route)
            if exemplar is not None:
                buckets = with_exemplar(buckets, exemplar)
            self.use.add_metric([name, route], buckets, total)
        for operation, (buckets, total) in snap.query.items():
            exemplar = query_exemplars.get(operation)
            if exemplar is not None:
                buckets = with_exemplar(buckets, exemplar)
            self.query.add_metric([name, operation], buckets, total)

    def all(self) -> Iterator[Metric]:
        yield from vars(self).values()
