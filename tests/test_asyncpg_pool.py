"""asyncpg's own pool, watched: exact counts, leaks with their line, timeouts by route, health,
and an unwatched pool left exactly as asyncpg made it. Real PostgreSQL throughout."""

from __future__ import annotations

import asyncio
import sys

import asyncpg  # type: ignore[import-untyped]
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

import poolwatch
from poolwatch._capture import asyncpg_pool
from poolwatch._record.events import shown_path
from tests.metrics import scrape


def _line() -> int:
    return sys._getframe(1).f_lineno


async def test_exact_counts_under_fifty_acquirers_with_cancellations(
    postgres_url: str, registry: CollectorRegistry
) -> None:
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=5)
    watch = poolwatch.watch(pool, registry=registry, name="apg")
    done = 0

    async def worker() -> None:
        nonlocal done
        async with pool.acquire() as connection:
            await connection.fetchval("SELECT pg_sleep(0.02)")
            done += 1

    tasks = [asyncio.create_task(worker()) for _ in range(50)]
    await asyncio.sleep(0.01)
    # Most are queued now: cancel ten of them, queued or holding.
    for task in tasks[-10:]:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert cancelled >= 1 and done == 50 - cancelled
    await asyncio.sleep(0.05)  # asyncpg calls query loggers soon after, not at once
    samples = scrape(registry)
    checkouts = samples.value("poolwatch_checkouts_total", pool="apg")
    assert checkouts == samples.value("poolwatch_checkins_total", pool="apg")
    assert done <= checkouts <= 50
    # Every call into acquire is observed once, cancelled ones included.
    assert samples.value("poolwatch_wait_seconds_count", pool="apg") == 50
    assert samples.value("poolwatch_connections", pool="apg", state="used") == 0
    assert samples.value("poolwatch_pending_requests", pool="apg") == 0
    assert samples.value("poolwatch_connections_max", pool="apg") == 5
    assert samples.value("poolwatch_query_seconds_count", pool="apg", operation="SELECT") >= done
    assert samples.value("poolwatch_connects_total", pool="apg") == pool.get_size() - 1
    info = samples.find("poolwatch_pool_info", pool="apg")
    assert info[0][0]["driver"] == "asyncpg" and info[0][0]["pool_class"] == "asyncpg.Pool"
    assert "postgres@" not in info[0][0]["server"]
    watch.close()
    await pool.close()


async def test_pending_counts_queued_callers_only(postgres_url: str, registry: CollectorRegistry) -> None:
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
    watch = poolwatch.watch(pool, registry=registry, name="one")
    held = await pool.acquire()
    waiters = [asyncio.create_task(pool.fetchval("SELECT 1")) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert scrape(registry).value("poolwatch_pending_requests", pool="one") == 3
    await pool.release(held)
    assert await asyncio.gather(*waiters) == [1, 1, 1]
    assert scrape(registry).value("poolwatch_pending_requests", pool="one") == 0
    watch.close()
    await pool.close()


async def test_leak_is_reported_with_the_line_that_acquired(
    postgres_url: str, registry: CollectorRegistry
) -> None:
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=2)
    watch = poolwatch.watch(pool, registry=registry, name="leaky", leak_threshold_seconds=0.2)
    with capture_logs() as events:
        connection = await pool.acquire(); line = _line()  # noqa: E702 - same line on purpose  # fmt: skip
        await asyncio.sleep(0.3)
        watch.recorders[0].sweep()
        assert scrape(registry).value("poolwatch_leaks_total", pool="leaky", route="<none>") == 1
        await pool.release(connection)
    detected = [e for e in events if e["event"] == "poolwatch.leak_detected"]
    assert len(detected) == 1, events
    assert detected[0]["site"] == f"{shown_path(__file__)}:{line}"
    assert detected[0]["function"] == "test_leak_is_reported_with_the_line_that_acquired"
    watch.close()
    await pool.close()


async def test_acquire_timeout_is_counted_under_its_route(
    postgres_url: str, registry: CollectorRegistry
) -> None:
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        try:
            async with pool.acquire(timeout=0.05) as connection:
                return {"value": await connection.fetchval("SELECT $1::int", item_id)}
        except TimeoutError:
            return {"value": -1}

    watch = poolwatch.instrument(app, pool, registry=registry, name="timed")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/items/7")).json() == {"value": 7}
        held = await pool.acquire()
        assert (await client.get("/items/8")).json() == {"value": -1}
        await pool.release(held)
    samples = scrape(registry)
    assert samples.value("poolwatch_timeouts_total", pool="timed", route="/items/{item_id}") == 1
    assert (
        samples.value("poolwatch_use_seconds_count", pool="timed", route="/items/{item_id}", method="GET")
        == 1
    )
    assert samples.value("poolwatch_request_queries_count", route="/items/{item_id}", method="GET") == 2
    watch.close()
    await pool.close()


async def test_health_ok_saturated_and_down(postgres_url: str, registry: CollectorRegistry) -> None:
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
    app = FastAPI()
    watch = poolwatch.instrument(
        app, pool, registry=registry, name="h", health_cache_seconds=0, health_stall_seconds=0.5
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        answer = await client.get("/health/db")
        assert (answer.status_code, answer.json()) == (200, {"status": "ok"})
        held = await pool.acquire()
        waiter = asyncio.create_task(pool.fetchval("SELECT 1"))
        await asyncio.sleep(0.05)
        answer = await client.get("/health/db")
        assert (answer.status_code, answer.json()) == (200, {"status": "degraded"})
        # Full, a caller queued and nothing moving for the stall window: down.
        await asyncio.sleep(0.6)
        await client.get("/health/db")
        await asyncio.sleep(0.6)
        answer = await client.get("/health/db")
        assert (answer.status_code, answer.json()) == (503, {"status": "down"})
        await pool.release(held)
        assert await waiter == 1
        answer = await client.get("/health/db")
        assert (answer.status_code, answer.json()) == (200, {"status": "ok"})
    samples = scrape(registry)
    # The probe's own checkouts are filed under <probe>, never the application's.
    assert samples.value("poolwatch_use_seconds_count", pool="h", route="<probe>", method="<none>") >= 2
    watch.close()
    await pool.close()


async def test_live_page_lists_the_checkouts(postgres_url: str, registry: CollectorRegistry) -> None:
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=2)
    app = FastAPI()
    watch = poolwatch.instrument(app, pool, registry=registry, name="page", ui="always")
    idle = await pool.acquire()
    await pool.release(idle)  # a checkout returned: no row
    connection = await pool.acquire(); line = _line()  # noqa: E702 - same line on purpose  # fmt: skip
    await connection.fetchval("SELECT 1")
    await connection.fetchval("SELECT 2")
    # asyncpg hands each statement to its query loggers with call_soon before the statement's await
    # returns: one turn of the loop runs them.
    await asyncio.sleep(0)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        state = (await client.get("/poolwatch/state")).json()
    await pool.release(connection)
    (found,) = [p for p in state["pools"] if p["name"] == "page"]
    rows = [dict(zip(found["connection_fields"], values, strict=True)) for values in found["connections"]]
    assert len(rows) == 1 and found["connections_out"] == 1
    assert rows[0]["site"] == f"{shown_path(__file__)}:{line}"
    assert rows[0]["function"] == "test_live_page_lists_the_checkouts"
    assert rows[0]["statements"] == 2
    assert found["driver"] == "asyncpg"
    watch.close()
    await pool.close()


async def test_unwatched_pools_are_left_as_asyncpg_made_them(
    postgres_url: str, registry: CollectorRegistry
) -> None:
    watched = await asyncpg.create_pool(postgres_url, min_size=1, max_size=2)
    other = await asyncpg.create_pool(postgres_url, min_size=1, max_size=2)
    watch = poolwatch.watch(watched, registry=registry, name="w")
    assert type(other) is asyncpg.pool.Pool
    assert type(watched) is not asyncpg.pool.Pool and isinstance(watched, asyncpg.pool.Pool)
    assert "get" not in other._queue.__dict__
    watch.close()
    assert type(watched) is asyncpg.pool.Pool
    assert "get" not in watched._queue.__dict__ and "put_nowait" not in watched._queue.__dict__
    async with watched.acquire() as connection:
        assert not connection._con._query_loggers
    await watched.close()
    await other.close()


async def test_a_pool_not_yet_awaited_and_an_unsupported_version_are_clear_errors(
    postgres_url: str, registry: CollectorRegistry
) -> None:
    pool = asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
    with pytest.raises(TypeError, match="not initialised yet"):
        poolwatch.watch(pool, registry=registry)
    with pytest.raises(asyncpg_pool.UnsupportedVersion, match=r"asyncpg 0\.27\.0 is not supported"):
        asyncpg_pool.check_supported("0.27.0")
    asyncpg_pool.check_supported(asyncpg.__version__)  # the installed one is


async def test_default_name_never_holds_the_user_or_password(registry: CollectorRegistry) -> None:
    pool = asyncpg.pool.Pool.__new__(asyncpg.pool.Pool)
    pool._connect_args = ["postgresql://alice:s3cret@db.example:6543/shop"]
    pool._connect_kwargs = {}
    assert asyncpg_pool.default_name(pool) == "db.example:6543/shop"
