"""The OpenTelemetry metrics bridge with asyncpg's and psycopg_pool's own pools: the same facts as
poolwatch's Prometheus metrics, under the database client semantic-convention names, read from the
recorders. Real PostgreSQL; the SDK's in-memory reader."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry
from psycopg_pool import AsyncConnectionPool, PoolTimeout

import poolwatch
from poolwatch import otel_bridge
from tests.metrics import scrape


def _points(reader: InMemoryMetricReader) -> dict[tuple[str, frozenset[tuple[str, Any]]], Any]:
    data = reader.get_metrics_data()
    assert data is not None
    found: dict[tuple[str, frozenset[tuple[str, Any]]], Any] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            if scope.scope.name == "poolwatch":
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        found[(metric.name, frozenset((point.attributes or {}).items()))] = point
    return found


def _point(points: dict[Any, Any], name: str, pool: str, **attributes: str) -> Any:
    wanted = {"db.client.connection.pool.name": pool, **attributes}
    return points[(name, frozenset(wanted.items()))]


async def _check(registry: CollectorRegistry, reader: InMemoryMetricReader, name: str, max_size: int) -> None:
    prometheus = scrape(registry)
    otel = _points(reader)
    for state in ("used", "idle"):
        assert _point(
            otel, "db.client.connection.count", name, **{"db.client.connection.state": state}
        ).value == (prometheus.value("poolwatch_connections", pool=name, state=state))
    assert (
        _point(otel, "db.client.connection.count", name, **{"db.client.connection.state": "used"}).value == 1
    )
    assert _point(otel, "db.client.connection.max", name).value == max_size
    assert _point(otel, "db.client.connection.pending_requests", name).value == 1
    assert _point(otel, "db.client.connection.timeouts", name).value == 1
    assert prometheus.total("poolwatch_timeouts_total", pool=name) == 1
    wait = _point(otel, "db.client.connection.wait_time", name)
    assert wait.count == prometheus.value("poolwatch_wait_seconds_count", pool=name) == 2
    assert wait.sum == pytest.approx(prometheus.value("poolwatch_wait_seconds_sum", pool=name), rel=1e-6)
    # The pool's one connection was opened before it was watched: no connect to report, and no
    # series rather than a zero.
    assert prometheus.value("poolwatch_connect_seconds_count", pool=name) == 0
    assert not [key for key in otel if key[0] == "db.client.connection.create_time"]
    duration = _point(
        otel, "db.client.operation.duration", name,
        **{"db.system.name": "postgresql", "db.operation.name": "SELECT"},
    )  # fmt: skip
    assert (
        duration.count
        == prometheus.value("poolwatch_query_seconds_count", pool=name, operation="SELECT")
        == 2
    )


async def test_the_bridge_reads_an_asyncpg_pool(postgres_url: str, registry: CollectorRegistry) -> None:
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
    watch = poolwatch.watch(pool, registry=registry, name="apg")
    reader = InMemoryMetricReader()
    otel_bridge(watch, MeterProvider(metric_readers=[reader]))
    try:
        connection = await pool.acquire()
        await connection.fetchval("SELECT 1")
        await connection.fetchval("SELECT 2")
        with pytest.raises(TimeoutError):
            await pool.acquire(timeout=0.05)

        async def acquire() -> Any:
            return await pool.acquire()

        waiter = asyncio.create_task(acquire())
        while scrape(registry).value("poolwatch_pending_requests", pool="apg") != 1:
            await asyncio.sleep(0.005)
        # asyncpg calls query loggers soon after a statement, on the loop: let them run.
        while scrape(registry).value("poolwatch_query_seconds_count", pool="apg", operation="SELECT") < 2:
            await asyncio.sleep(0.005)
        await _check(registry, reader, "apg", max_size=1)
        await pool.release(connection)
        await pool.release(await waiter)
        # A second collection: the use times gained since, on top of the first (cumulative).
        otel = _points(reader)
        prometheus = scrape(registry)
        assert (
            _point(otel, "db.client.connection.use_time", "apg").count
            == prometheus.total("poolwatch_use_seconds_count", pool="apg")
            == 2
        )
    finally:
        watch.close()
        pool.terminate()  # whatever is still out, even after a failed assertion


async def test_the_bridge_reads_a_psycopg_pool(postgres_url: str, registry: CollectorRegistry) -> None:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(postgres_url, min_size=1, max_size=1, open=False)
    await pool.open(wait=True)
    watch = poolwatch.watch(pool, registry=registry, name="pg")
    reader = InMemoryMetricReader()
    otel_bridge(watch, MeterProvider(metric_readers=[reader]))
    try:
        connection = await pool.getconn()
        await connection.execute("SELECT 1")
        await connection.execute("SELECT 2")
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=0.05)
        waiter = asyncio.create_task(pool.getconn())
        while scrape(registry).value("poolwatch_pending_requests", pool="pg") != 1:
            await asyncio.sleep(0.005)
        await _check(registry, reader, "pg", max_size=1)
        await pool.putconn(connection)
        await pool.putconn(await waiter)
        otel = _points(reader)
        prometheus = scrape(registry)
        assert (
            _point(otel, "db.client.connection.use_time", "pg").count
            == prometheus.total("poolwatch_use_seconds_count", pool="pg")
            == 2
        )
    finally:
        watch.close()
        await pool.close(timeout=1)
