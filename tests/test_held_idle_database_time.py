"""Held idle is hold time minus time waiting on the database, whatever form the waiting takes.

Against the real PostgreSQL, with psycopg (sync) and asyncpg (async). Each case spends a known
second (``DB_SECONDS``) waiting on the database in a way a plain statement timer misses, and the
checkout must not be reported held idle for it (the held-idle setting, 0.5 s, sits half-way between
that second and the few milliseconds of Python around it):

- a server-side cursor streamed in small batches, where the query runs as its rows are fetched
  (``pg_sleep`` per row: the time goes into the fetches, not the execute);
- a statement that fails on ``statement_timeout`` after a second, and a stream that fails so;
- a statement cancelled after a second (asyncio cancellation; psycopg's ``cancel()``).

And the situation that fools the other way: a stream that sleeps in Python between its rows holds
its connection idle for that second, and is reported so.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import poolwatch
from poolwatch._record import events
from poolwatch._record.events import Event, HeldIdle
from tests.metrics import scrape

DB_SECONDS = 1.0  # time spent waiting on the database in each case
HELD_IDLE_SECONDS = 0.5  # the setting: between ~0 and DB_SECONDS, far from both
ROWS = 10
# Each row costs DB_SECONDS / ROWS on the server: the time is spent as rows are produced.
STREAM = sa.text(f"SELECT pg_sleep({DB_SECONDS / ROWS}), g FROM generate_series(1, {ROWS}) AS g")
SLOW = sa.text(f"SELECT pg_sleep({DB_SECONDS * 10})")
TIMEOUT = sa.text(f"SET LOCAL statement_timeout = {int(DB_SECONDS * 1000)}")


@pytest.fixture
def recorded() -> Iterator[list[Event]]:
    taken: list[Event] = []
    previous = events.set_sinks([taken.append])
    yield taken
    events.set_sinks(previous)


@pytest.fixture
def sync_engine(sync_url: str, registry: CollectorRegistry) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0)
    with engine.connect() as connection:  # the dialect's first-connect statements
        connection.execute(sa.text("SELECT 1"))
    watch = poolwatch.watch(engine, registry=registry, name="db", held_idle_seconds=HELD_IDLE_SECONDS)
    yield engine
    watch.close()
    engine.dispose()


@pytest.fixture
async def async_engine(async_url: str, registry: CollectorRegistry) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(async_url, pool_size=1, max_overflow=0)
    async with engine.connect() as connection:
        await connection.execute(sa.text("SELECT 1"))
    watch = poolwatch.watch(engine, registry=registry, name="db", held_idle_seconds=HELD_IDLE_SECONDS)
    yield engine
    watch.close()
    await engine.dispose()


def held_and_idle(registry: CollectorRegistry) -> tuple[float, float]:
    """(seconds held, seconds held idle) of the one checkout the test made, outside any request."""
    samples = scrape(registry)
    assert samples.value("poolwatch_use_seconds_count", pool="db", route="<none>", method="<none>") == 1
    held = samples.value("poolwatch_use_seconds_sum", pool="db", route="<none>", method="<none>")
    idle = samples.value("poolwatch_held_idle_seconds_sum", pool="db", route="<none>")
    return held, idle


def assert_waited_on_database(registry: CollectorRegistry, recorded: list[Event]) -> None:
    held, idle = held_and_idle(registry)
    assert held >= DB_SECONDS
    assert idle < HELD_IDLE_SECONDS, f"held {held:.3f} s, of which {idle:.3f} s reported idle"
    assert not [e for e in recorded if isinstance(e, HeldIdle)]


# -- psycopg (sync) -------------------------------------------------------------------------------


@pytest.mark.parametrize("fetch", ["iterate", "partitions", "all"])
def test_sync_stream_fetches_are_database_time(
    sync_engine: sa.Engine, registry: CollectorRegistry, recorded: list[Event], fetch: str
) -> None:
    with sync_engine.connect() as connection:
        result = connection.execution_options(yield_per=2).execute(STREAM)
        assert result.context._is_server_side  # psycopg's named cursor: FETCH FORWARD per batch
        if fetch == "iterate":
            rows = [row.g for row in result]
        elif fetch == "partitions":
            rows = [row.g for part in result.partitions(3) for row in part]
        else:
            rows = [row.g for row in result.all()]
    assert rows == list(range(1, ROWS + 1))
    assert_waited_on_database(registry, recorded)


def test_sync_python_work_between_fetches_is_idle(
    sync_engine: sa.Engine, registry: CollectorRegistry, recorded: list[Event]
) -> None:
    """The other way round: time between the rows of a stream is the application's, not the
    database's, and a checkout that spends it holding the connection is held idle."""
    with sync_engine.connect() as connection:
        result = connection.execution_options(yield_per=1).execute(
            sa.text("SELECT g FROM generate_series(1, 4) AS g")
        )
        for _ in result:
            time.sleep(DB_SECONDS / 4)  # rendering, an HTTP call: with the cursor open
    held, idle = held_and_idle(registry)
    assert DB_SECONDS <= idle <= held
    [event] = [e for e in recorded if isinstance(e, HeldIdle)]
    assert event.seconds_idle >= DB_SECONDS


def test_sync_statement_timeout_is_database_time(
    sync_engine: sa.Engine, registry: CollectorRegistry, recorded: list[Event]
) -> None:
    with sync_engine.connect() as connection:
        connection.execute(TIMEOUT)
        with pytest.raises(sa.exc.OperationalError, match="statement timeout"):
            connection.execute(SLOW)
    assert_waited_on_database(registry, recorded)
    assert (
        scrape(registry).value(
            "poolwatch_query_errors_total", pool="db", operation="SELECT", error="QueryCanceled"
        )
        == 1
    )


def test_sync_stream_that_times_out_is_database_time(
    sync_engine: sa.Engine, registry: CollectorRegistry, recorded: list[Event]
) -> None:
    """The timeout strikes during a fetch, not the execute: a stream's query runs as it is read.
    (The timeout applies to each FETCH, so one batch is made to take longer than it.)"""
    long_stream = sa.text(f"SELECT pg_sleep({DB_SECONDS / ROWS}), g FROM generate_series(1, 100) AS g")
    with sync_engine.connect() as connection:
        connection.execute(TIMEOUT)
        result = connection.execution_options(yield_per=3 * ROWS).execute(long_stream)
        with pytest.raises(sa.exc.OperationalError, match="statement timeout"):
            for _ in result:
                pass
    assert_waited_on_database(registry, recorded)


def test_sync_cancelled_statement_is_database_time(
    sync_engine: sa.Engine, registry: CollectorRegistry, recorded: list[Event]
) -> None:
    with sync_engine.connect() as connection:
        dbapi_connection = connection.connection.dbapi_connection
        assert dbapi_connection is not None
        canceller = threading.Timer(DB_SECONDS, dbapi_connection.cancel)  # psycopg: thread-safe
        canceller.start()
        try:
            with pytest.raises(sa.exc.OperationalError, match="canceling statement"):
                connection.execute(SLOW)
        finally:
            canceller.join()
    assert_waited_on_database(registry, recorded)


# -- asyncpg (async) ------------------------------------------------------------------------------


@pytest.mark.parametrize("fetch", ["async_for", "partitions", "all"])
async def test_async_stream_fetches_are_database_time(
    async_engine: AsyncEngine, registry: CollectorRegistry, recorded: list[Event], fetch: str
) -> None:
    async with async_engine.connect() as connection:
        result = await connection.stream(STREAM.execution_options(yield_per=2))
        if fetch == "async_for":
            rows = [row.g async for row in result]
        elif fetch == "partitions":
            rows = [row.g async for part in result.partitions(3) for row in part]
        else:
            rows = [row.g for row in await result.all()]
    assert rows == list(range(1, ROWS + 1))
    assert_waited_on_database(registry, recorded)


async def test_async_session_stream_fetches_are_database_time(
    async_engine: AsyncEngine, registry: CollectorRegistry, recorded: list[Event]
) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession

    async with AsyncSession(async_engine) as session:
        result = await session.stream(STREAM)
        rows = [row.g async for row in result]
    assert rows == list(range(1, ROWS + 1))
    assert_waited_on_database(registry, recorded)


async def test_async_python_work_between_fetches_is_idle(
    async_engine: AsyncEngine, registry: CollectorRegistry, recorded: list[Event]
) -> None:
    async with async_engine.connect() as connection:
        result = await connection.stream(
            sa.text("SELECT g FROM generate_series(1, 4) AS g").execution_options(yield_per=1)
        )
        async for _ in result:
            await asyncio.sleep(DB_SECONDS / 4)
    held, idle = held_and_idle(registry)
    assert DB_SECONDS <= idle <= held
    [event] = [e for e in recorded if isinstance(e, HeldIdle)]
    assert event.seconds_idle >= DB_SECONDS


async def test_async_statement_timeout_is_database_time(
    async_engine: AsyncEngine, registry: CollectorRegistry, recorded: list[Event]
) -> None:
    async with async_engine.connect() as connection:
        await connection.execute(TIMEOUT)
        with pytest.raises(sa.exc.DBAPIError, match="statement timeout"):
            await connection.execute(SLOW)
    assert_waited_on_database(registry, recorded)


async def test_async_cancelled_statement_is_database_time(
    async_engine: AsyncEngine, registry: CollectorRegistry, recorded: list[Event]
) -> None:
    started = asyncio.Event()

    async def slow_query() -> None:
        async with async_engine.connect() as connection:
            started.set()
            await connection.execute(SLOW)

    task = asyncio.create_task(slow_query())
    await started.wait()
    await asyncio.sleep(DB_SECONDS)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_waited_on_database(registry, recorded)
