"""psycopg_pool's own pools, watched: exact counts, statements, leaks with their line, timeouts by
route, health, live page rows, and an unwatched pool left exactly as psycopg_pool made it. Real
PostgreSQL throughout."""

from __future__ import annotations

import asyncio
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout
from structlog.testing import capture_logs

import poolwatch
from poolwatch._capture import psycopg_pool as capture
from poolwatch._record.events import shown_path
from tests.metrics import scrape


def _line() -> int:
    return sys._getframe(1).f_lineno


async def _async_pool(url: str, **kwargs: Any) -> AsyncConnectionPool[Any]:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(url, open=False, **kwargs)
    await pool.open(wait=True)
    return pool


async def test_exact_counts_under_fifty_acquirers_with_cancellations(
    postgres_url: str, registry: CollectorRegistry
) -> None:
    pool = await _async_pool(postgres_url, min_size=1, max_size=5)
    watch = poolwatch.watch(pool, registry=registry, name="pg")
    done = 0

    async def worker() -> None:
        nonlocal done
        async with pool.connection() as connection:
            await connection.execute("SELECT pg_sleep(0.02)")
            done += 1

    tasks = [asyncio.create_task(worker()) for _ in range(50)]
    await asyncio.sleep(0.01)
    # Most are queued now: cancel ten of them, queued or holding.
    for task in tasks[-10:]:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert cancelled >= 1 and done == 50 - cancelled
    samples = scrape(registry)
    checkouts = samples.value("poolwatch_checkouts_total", pool="pg")
    assert checkouts == samples.value("poolwatch_checkins_total", pool="pg")
    assert done <= checkouts <= 50
    # Every call into getconn is observed once, cancelled ones included.
    assert samples.value("poolwatch_wait_seconds_count", pool="pg") == 50
    assert samples.value("poolwatch_connections", pool="pg", state="used") == 0
    assert samples.value("poolwatch_pending_requests", pool="pg") == 0
    assert samples.value("poolwatch_connections_max", pool="pg") == 5
    # A statement is timed when it completes; a cancelled one is neither a time nor an error.
    assert samples.value("poolwatch_query_seconds_count", pool="pg", operation="SELECT") == done
    stats = pool.get_stats()
    assert samples.value("poolwatch_connects_total", pool="pg") == stats["connections_num"] - 1
    info = samples.find("poolwatch_pool_info", pool="pg")
    assert info[0][0]["driver"] == "psycopg"
    assert info[0][0]["pool_class"] == "psycopg_pool.AsyncConnectionPool"
    assert "postgres@" not in info[0][0]["server"]
    watch.close()
    await pool.close()


def test_exact_counts_under_fifty_threads(postgres_url: str, registry: CollectorRegistry) -> None:
    with ConnectionPool(postgres_url, min_size=1, max_size=4, open=True) as pool:
        pool.wait()
        watch = poolwatch.watch(pool, registry=registry, name="sync")
        start = threading.Barrier(50)

        def worker(_: int) -> int:
            start.wait()
            with pool.connection() as connection:
                value = connection.execute("SELECT 1 FROM pg_sleep(0.01)").fetchone()
                return 0 if value is None else int(value[0])

        with ThreadPoolExecutor(50) as executor:
            assert sum(executor.map(worker, range(50))) == 50
        samples = scrape(registry)
        assert samples.value("poolwatch_checkouts_total", pool="sync") == 50
        assert samples.value("poolwatch_checkins_total", pool="sync") == 50
        assert samples.value("poolwatch_wait_seconds_count", pool="sync") == 50
        assert samples.value("poolwatch_query_seconds_count", pool="sync", operation="SELECT") == 50
        assert samples.value("poolwatch_connections", pool="sync", state="used") == 0
        assert samples.value("poolwatch_pending_requests", pool="sync") == 0
        assert samples.value("poolwatch_connections_max", pool="sync") == 4
        # Held-idle is hold time minus time in statements: never more than the hold time.
        held = samples.value("poolwatch_use_seconds_sum", pool="sync", route="<none>", method="<none>")
        idle = samples.value("poolwatch_held_idle_seconds_sum", pool="sync", route="<none>")
        assert 0 <= idle < held
        watch.close()


async def test_pending_counts_queued_callers_only(postgres_url: str, registry: CollectorRegistry) -> None:
    pool = await _async_pool(postgres_url, min_size=1, max_size=1)
    watch = poolwatch.watch(pool, registry=registry, name="one")
    held = await pool.getconn()
    assert scrape(registry).value("poolwatch_pending_requests", pool="one") == 0

    async def one() -> Any:
        async with pool.connection() as connection:
            cursor = await connection.execute("SELECT 1")
            return (await cursor.fetchone())[0]

    waiters = [asyncio.create_task(one()) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert scrape(registry).value("poolwatch_pending_requests", pool="one") == 3
    await pool.putconn(held)
    assert await asyncio.gather(*waiters) == [1, 1, 1]
    assert scrape(registry).value("poolwatch_pending_requests", pool="one") == 0
    watch.close()
    await pool.close()


def test_leak_is_reported_with_the_line_that_acquired(postgres_url: str, registry: CollectorRegistry) -> None:
    with ConnectionPool(postgres_url, min_size=1, max_size=2, open=True) as pool:
        watch = poolwatch.watch(pool, registry=registry, name="leaky", leak_threshold_seconds=0.2)
        with capture_logs() as events:
            connection = pool.getconn(); line = _line()  # noqa: E702 - same line on purpose  # fmt: skip
            connection.execute("SELECT 1")
            threading.Event().wait(0.3)
            watch.recorders[0].sweep()
            assert scrape(registry).value("poolwatch_leaks_total", pool="leaky", route="<none>") == 1
            pool.putconn(connection)
        detected = [e for e in events if e["event"] == "poolwatch.leak_detected"]
        assert len(detected) == 1, events
        assert detected[0]["site"] == f"{shown_path(__file__)}:{line}"
        assert detected[0]["function"] == "test_leak_is_reported_with_the_line_that_acquired"
        assert detected[0]["statements"] == 1
        watch.close()


async def test_pool_timeout_is_counted_under_its_route(
    postgres_url: str, registry: CollectorRegistry
) -> None:
    pool = await _async_pool(postgres_url, min_size=1, max_size=1)
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        try:
            async with pool.connection(timeout=0.05) as connection:
                cursor = await connection.execute("SELECT %s::int", (item_id,))
                row = await cursor.fetchone()
                return {"value": -2 if row is None else row[0]}
        except PoolTimeout:
            return {"value": -1}

    watch = poolwatch.instrument(app, pool, registry=registry, name="timed")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/items/7")).json() == {"value": 7}
        held = await pool.getconn()
        assert (await client.get("/items/8")).json() == {"value": -1}
        await pool.putconn(held)
    samples = scrape(registry)
    assert samples.value("poolwatch_timeouts_total", pool="timed", route="/items/{item_id}") == 1
    assert samples.value("poolwatch_timeouts_total", pool="timed", route="<none>") == 0
    assert (
        samples.value("poolwatch_use_seconds_count", pool="timed", route="/items/{item_id}", method="GET")
        == 1
    )
    assert samples.value("poolwatch_request_queries_sum", route="/items/{item_id}", method="GET") == 1
    watch.close()
    await pool.close()


async def test_health_ok_saturated_and_down(postgres_url: str, registry: CollectorRegistry) -> None:
    pool = await _async_pool(postgres_url, min_size=1, max_size=1)
    app = FastAPI()
    watch = poolwatch.instrument(
        app, pool, registry=registry, name="h", health_cache_seconds=0, health_stall_seconds=0.5
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        answer = await client.get("/health/db")
        assert (answer.status_code, answer.json()) == (200, {"status": "ok"})
        held = await pool.getconn()
        waiter = asyncio.create_task(pool.getconn())
        await asyncio.sleep(0.05)
        answer = await client.get("/health/db")
        assert (answer.status_code, answer.json()) == (200, {"status": "degraded"})
        # Full, a caller queued and nothing moving for the stall window: down.
        await asyncio.sleep(0.6)
        await client.get("/health/db")
        await asyncio.sleep(0.6)
        answer = await client.get("/health/db")
        assert (answer.status_code, answer.json()) == (503, {"status": "down"})
        await pool.putconn(held)
        await pool.putconn(await waiter)
        answer = await client.get("/health/db")
        assert (answer.status_code, answer.json()) == (200, {"status": "ok"})
    samples = scrape(registry)
    # The probe's own checkouts are filed under <probe>, and its ping is not an app statement.
    assert samples.value("poolwatch_use_seconds_count", pool="h", route="<probe>", method="<none>") >= 2
    assert samples.value("poolwatch_query_seconds_count", pool="h", operation="SELECT") == 0
    watch.close()
    await pool.close()


def test_health_of_a_sync_pool_is_probed_on_a_thread(postgres_url: str, registry: CollectorRegistry) -> None:
    with ConnectionPool(postgres_url, min_size=1, max_size=1, open=True) as pool:
        pool.wait()  # else its one connection is still being opened: a full pool, never probed
        app = FastAPI()
        watch = poolwatch.instrument(app, pool, registry=registry, name="s", health_cache_seconds=0)
        from fastapi.testclient import TestClient

        with TestClient(app) as client:
            answer = client.get("/health/db")
            assert (answer.status_code, answer.json()) == (200, {"status": "ok"})
        assert (
            scrape(registry).value("poolwatch_use_seconds_count", pool="s", route="<probe>", method="<none>")
            == 1
        )
        watch.close()


async def test_live_page_lists_the_checkouts(postgres_url: str, registry: CollectorRegistry) -> None:
    pool = await _async_pool(postgres_url, min_size=1, max_size=2)
    app = FastAPI()
    watch = poolwatch.instrument(app, pool, registry=registry, name="page", ui="always")
    connection = await pool.getconn(); line = _line()  # noqa: E702 - same line on purpose  # fmt: skip
    await connection.execute("SELECT 1")
    await connection.execute("SELECT 2")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        state = (await client.get("/poolwatch/state")).json()
    await pool.putconn(connection)
    (found,) = [p for p in state["pools"] if p["name"] == "page"]
    rows = [dict(zip(found["connection_fields"], values, strict=True)) for values in found["connections"]]
    assert len(rows) == 1 and found["connections_out"] == 1
    assert rows[0]["site"] == f"{shown_path(__file__)}:{line}"
    assert rows[0]["function"] == "test_live_page_lists_the_checkouts"
    assert rows[0]["statements"] == 2
    assert found["driver"] == "psycopg"
    watch.close()
    await pool.close()


def test_disconnects_name_their_reason(postgres_url: str, registry: CollectorRegistry) -> None:
    with ConnectionPool(postgres_url, min_size=2, max_size=2, open=True) as pool:
        pool.wait()
        watch = poolwatch.watch(pool, registry=registry, name="d")
        pool.drain()  # closes the idle ones, opens new ones
        pool.wait()
        with pool.connection() as connection:
            # A connection whose server side went away comes back broken.
            pid = connection.info.backend_pid
            with psycopg.connect(postgres_url, autocommit=True) as other:
                other.execute("SELECT pg_terminate_backend(%s)", (pid,))
            with pytest.raises(psycopg.OperationalError):
                connection.execute("SELECT 1")
        samples = scrape(registry)
        assert samples.value("poolwatch_disconnects_total", pool="d", reason="disposed") == 2
        assert samples.value("poolwatch_disconnects_total", pool="d", reason="invalidated") == 1
        assert (
            samples.value("poolwatch_query_errors_total", pool="d", operation="SELECT", error="AdminShutdown")
            == 1
        )
        watch.close()


async def test_unwatched_pools_are_left_as_psycopg_pool_made_them(
    postgres_url: str, registry: CollectorRegistry
) -> None:
    watched = await _async_pool(postgres_url, min_size=1, max_size=2)
    other = await _async_pool(postgres_url, min_size=1, max_size=2)
    before = dict(watched.__dict__)
    watch = poolwatch.watch(watched, registry=registry, name="w")
    assert "getconn" in watched.__dict__ and "getconn" not in other.__dict__
    held = await watched.getconn()
    assert type(held.cursor_factory) is not psycopg.AsyncCursor  # timed while out
    returned = await watched.getconn()
    await watched.putconn(returned)  # back in the pool: it keeps its timed factory until unwatch
    assert type(returned.cursor_factory) is not psycopg.AsyncCursor
    watch.close()
    assert held.cursor_factory is psycopg.AsyncCursor  # given back at unwatch, while still out
    assert returned.cursor_factory is psycopg.AsyncCursor  # and while idle in the pool
    await watched.putconn(held)
    assert watched.__dict__.keys() == before.keys()
    async with watched.connection() as connection:
        assert connection.cursor_factory is psycopg.AsyncCursor
    await watched.close()
    await other.close()


def test_statements_of_the_pools_own_check_and_reset_are_not_the_applications(
    postgres_url: str, registry: CollectorRegistry
) -> None:
    def reset(connection: psycopg.Connection[Any]) -> None:
        connection.execute("SELECT 1")
        connection.rollback()

    with ConnectionPool(
        postgres_url, min_size=1, max_size=1, open=True, check=ConnectionPool.check_connection, reset=reset
    ) as pool:
        pool.wait()
        watch = poolwatch.watch(pool, registry=registry, name="own")
        for _ in range(3):
            with pool.connection() as connection:
                connection.execute("SELECT 1")
        # The last reset runs on psycopg_pool's worker: done once the connection is idle again.
        while pool.get_stats().get("pool_available", 0) != 1:
            threading.Event().wait(0.01)
        samples = scrape(registry)
        assert samples.total("poolwatch_query_seconds_count", pool="own") == 3
        assert samples.value("poolwatch_query_seconds_count", pool="own", operation="SELECT") == 3
        assert samples.value("poolwatch_checkouts_total", pool="own") == 3
        watch.close()


def test_unsupported_version_and_wrong_objects_are_clear_errors(registry: CollectorRegistry) -> None:
    with pytest.raises(capture.UnsupportedVersion, match=r"psycopg_pool 3\.1\.0 is not supported"):
        capture.check_supported("3.1.0")
    capture.check_supported()  # the installed one is
    with pytest.raises(TypeError, match="psycopg_pool ConnectionPool or AsyncConnectionPool"):
        poolwatch.watch(object(), registry=registry)  # type: ignore[arg-type]


def test_default_name_never_holds_the_user_or_password(registry: CollectorRegistry) -> None:
    pool = ConnectionPool("postgresql://alice:s3cret@db.example:6543/shop", open=False)
    assert capture.default_name(pool) == "db.example:6543/shop"
    named = ConnectionPool("host=db.example dbname=shop user=alice", open=False, name="orders")
    assert capture.default_name(named) == "orders"
