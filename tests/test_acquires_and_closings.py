"""Acquires, closings and each connection's life (issue 27 §4, §5), on real PostgreSQL with psycopg
(sync) and asyncpg.

What would fool them: a checkout served at once is not queued, nor is one that opened a connection;
a caller woken without a connection (another took it first) waits again but is one queued checkout;
a timeout is not a cancelled wait; the age of the connection is not the age of the checkout, and a
new connection in the same pool slot starts again at zero uses.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import create_async_engine

import poolwatch
from poolwatch._serve.state import CONNECTION_FIELDS, StateBuilder
from tests.fault_fixtures import wait_until, wait_until_async
from tests.metrics import scrape

REASONS = ("recycled", "invalidated", "overflow", "reset_failed", "disposed", "other")


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return float(scrape(registry).value(name, **labels))


def _reasons(registry: CollectorRegistry, pool: str) -> dict[str, float]:
    return {
        reason: _value(registry, "poolwatch_disconnects_total", pool=pool, reason=reason)
        for reason in REASONS
    }


def _rows(watch: poolwatch.PoolWatch) -> list[dict[str, Any]]:
    [recorder] = watch.recorders
    state = json.loads(StateBuilder().build([(recorder.name, recorder)], None))
    return [dict(zip(CONNECTION_FIELDS, row, strict=True)) for row in state["pools"][0]["connections"]]


def test_psycopg_queued_checkouts_count_once_each(sync_url: str, registry: CollectorRegistry) -> None:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0, pool_timeout=30)
    watch = poolwatch.watch(engine, registry=registry, name="queue")
    try:
        for _ in range(3):  # served at once (the first opens the connection): not queued
            with engine.connect():
                pass
        assert _value(registry, "poolwatch_checkouts_queued_total", pool="queue") == 0
        holder = engine.connect()
        waiters = 3

        def wait_and_use() -> None:
            with engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")

        with ThreadPoolExecutor(waiters) as executor:
            futures = [executor.submit(wait_and_use) for _ in range(waiters)]
            wait_until(
                lambda: _value(registry, "poolwatch_pending_requests", pool="queue") == waiters,
                10,
                "the callers never queued",
            )
            holder.close()
            for future in futures:
                future.result()
        # Each waiter was woken as the one connection went round, some of them more than once.
        assert _value(registry, "poolwatch_checkouts_queued_total", pool="queue") == waiters
        assert _value(registry, "poolwatch_checkouts_total", pool="queue") == 3 + 1 + waiters
    finally:
        watch.close()
        engine.dispose()


def test_psycopg_a_timeout_is_not_a_cancelled_wait(sync_url: str, registry: CollectorRegistry) -> None:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    watch = poolwatch.watch(engine, registry=registry, name="timeout")
    try:
        with engine.connect(), pytest.raises(sa.exc.TimeoutError):
            engine.connect()
        assert _value(registry, "poolwatch_timeouts_total", pool="timeout", route="<none>") == 1
        assert _value(registry, "poolwatch_waits_cancelled_total", pool="timeout", route="<none>") == 0
        assert _value(registry, "poolwatch_checkouts_queued_total", pool="timeout") == 0
    finally:
        watch.close()
        engine.dispose()


async def test_asyncpg_queued_and_cancelled_waits(async_url: str, registry: CollectorRegistry) -> None:
    engine = create_async_engine(async_url, pool_size=1, max_overflow=0, pool_timeout=30)
    watch = poolwatch.watch(engine, registry=registry, name="aqueue")
    try:
        async with engine.connect():
            pass
        holder = await engine.connect()

        async def use() -> None:
            async with engine.connect() as connection:
                await connection.exec_driver_sql("SELECT 1")

        served = asyncio.create_task(use())
        cancelled = asyncio.create_task(use())
        await wait_until_async(
            lambda: _value(registry, "poolwatch_pending_requests", pool="aqueue") == 2, 10, "no queue"
        )
        cancelled.cancel()  # the client went away while waiting
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await holder.close()
        await served
        assert _value(registry, "poolwatch_waits_cancelled_total", pool="aqueue", route="<none>") == 1
        assert _value(registry, "poolwatch_timeouts_total", pool="aqueue", route="<none>") == 0
        # The served waiter queued; the first checkout and the holder did not.
        assert _value(registry, "poolwatch_checkouts_queued_total", pool="aqueue") == 1
    finally:
        watch.close()
        await engine.dispose()


def _terminate_backend(sync_url: str, pid: int) -> None:
    url = sa.make_url(sync_url).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_psycopg_every_closing_has_its_reason(sync_url: str, registry: CollectorRegistry) -> None:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=1)
    watch = poolwatch.watch(engine, registry=registry, name="close")
    try:
        expected = dict.fromkeys(REASONS, 0.0)
        # overflow: two out at once, the second back to a full pool
        first, second = engine.connect(), engine.connect()
        first.close()
        second.close()
        expected["overflow"] += 1
        assert _reasons(registry, "close") == expected
        # invalidated
        with engine.connect() as connection:
            connection.invalidate()
        expected["invalidated"] += 1
        assert _reasons(registry, "close") == expected
        # reset_failed: the server ended the session while it was out in a transaction, so the
        # pool's rollback on return fails
        pool_connection = engine.pool.connect()
        pid = pool_connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
        pool_connection.cursor().execute("SELECT 1")  # a transaction is open now
        _terminate_backend(sync_url, pid)
        pool_connection.close()
        expected["reset_failed"] += 1
        assert _reasons(registry, "close") == expected
        # recycled: older than pool_recycle at checkout
        with engine.connect():  # a live connection in the slot again
            pass
        engine.pool._recycle = 0  # every connection is older than 0 s
        time.sleep(0.01)
        with engine.connect():
            pass
        engine.pool._recycle = -1
        expected["recycled"] += 1
        assert _reasons(registry, "close") == expected
        # other: a detached connection closed
        with engine.connect() as connection:
            connection.detach()
        expected["other"] += 1
        assert _reasons(registry, "close") == expected
        # disposed
        with engine.connect():
            pass
        engine.dispose()
        expected["disposed"] += 1
        assert _reasons(registry, "close") == expected
        assert _value(registry, "poolwatch_checkouts_total", pool="close") > 0
        assert scrape(registry).total("poolwatch_disconnects_total", pool="close") == sum(expected.values())
    finally:
        watch.close()
        engine.dispose()


async def test_asyncpg_closings_by_reason(async_url: str, registry: CollectorRegistry) -> None:
    engine = create_async_engine(async_url, pool_size=1, max_overflow=1)
    watch = poolwatch.watch(engine, registry=registry, name="aclose")
    try:
        first, second = await engine.connect(), await engine.connect()
        await first.close()
        await second.close()
        async with engine.connect() as connection:
            await connection.invalidate()
        async with engine.connect():
            pass
        await engine.dispose()
        got = _reasons(registry, "aclose")
        assert got == {**dict.fromkeys(REASONS, 0.0), "overflow": 1, "invalidated": 1, "disposed": 1}
    finally:
        watch.close()
        await engine.dispose()


def test_psycopg_each_row_shows_its_connection_age_and_uses(
    sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0)
    watch = poolwatch.watch(engine, registry=registry, name="life")
    try:
        for _ in range(2):
            with engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")
        time.sleep(0.05)
        with engine.connect():
            [row] = _rows(watch)
            assert row["uses"] == 3  # the same DBAPI connection, third checkout
            # The connection is older than this checkout: it served two before it.
            assert row["connection_age_ms"] >= row["age_ms"] + 50
        with engine.connect() as connection:
            connection.invalidate()  # the slot's next checkout opens a new connection
        with engine.connect():
            [row] = _rows(watch)
            assert row["uses"] == 1
            assert row["connection_age_ms"] is not None
    finally:
        watch.close()
        engine.dispose()


async def test_asyncpg_each_row_shows_its_connection_age_and_uses(
    async_url: str, registry: CollectorRegistry
) -> None:
    engine = create_async_engine(async_url, pool_size=1, max_overflow=0)
    watch = poolwatch.watch(engine, registry=registry, name="alife")
    try:
        for _ in range(4):
            async with engine.connect() as connection:
                await connection.exec_driver_sql("SELECT 1")
        await asyncio.sleep(0.05)
        async with engine.connect():
            [row] = _rows(watch)
            assert row["uses"] == 5
            assert row["connection_age_ms"] >= row["age_ms"] + 50
    finally:
        watch.close()
        await engine.dispose()


def test_queued_marks_do_not_leak_between_threads(sync_url: str, registry: CollectorRegistry) -> None:
    """A thread that queued and then timed out leaves no mark: its next checkout, served at once,
    is not counted as queued."""
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    watch = poolwatch.watch(engine, registry=registry, name="marks")
    try:
        holder = engine.connect()
        outcome: list[str] = []

        def time_out_then_checkout() -> None:
            try:
                engine.connect()
            except sa.exc.TimeoutError:
                outcome.append("timeout")
            release.wait(10)
            with engine.connect():
                outcome.append("served")

        release = threading.Event()
        thread = threading.Thread(target=time_out_then_checkout)
        thread.start()
        wait_until(lambda: outcome == ["timeout"], 10, "no timeout")
        holder.close()
        release.set()
        thread.join(10)
        assert outcome == ["timeout", "served"]
        assert _value(registry, "poolwatch_checkouts_queued_total", pool="marks") == 0
    finally:
        watch.close()
        engine.dispose()
