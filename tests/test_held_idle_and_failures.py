"""Causes, not symptoms: time held idle, the route that gave up, failed connects, HTTP methods.

Against the real PostgreSQL, through a real FastAPI app on an asyncpg engine (httpx's ASGI
transport, in-process): each cause is made on purpose with a known size, and the metric or event
that names it is read back.

- An endpoint that holds its session across ``await asyncio.sleep(1)`` between two statements has
  held its connection idle for at least 1 s; one that spends the same second inside ``pg_sleep`` has
  held it idle for almost nothing. The two differ by a second, so the bound between them (0.5 s) is
  far from both.
- A checkout that times out inside a request names that request's route.
- An engine pointed at a port nobody listens on counts each refused attempt to connect.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import poolwatch
from poolwatch._record import events
from poolwatch._record.events import Event, HeldIdle, LeakDetected, PoolTimeout
from tests.metrics import scrape

IDLE = 1.0  # what the idle endpoint sleeps between its statements, and pg_sleep's time
HELD_IDLE_SECONDS = 0.5  # the setting: between ~0 and IDLE, far from both


@pytest.fixture
def recorded() -> Iterator[list[Event]]:
    """Every event poolwatch emits during the test, instead of the log."""
    taken: list[Event] = []
    previous = events.set_sinks([taken.append])
    yield taken
    events.set_sinks(previous)


@pytest.fixture
async def engine(async_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(async_url, pool_size=1, max_overflow=0, pool_timeout=30)
    async with engine.connect() as connection:  # the dialect's first-connect statements
        await connection.execute(sa.text("SELECT 1"))
    yield engine
    await engine.dispose()


def _app(engine: AsyncEngine) -> FastAPI:
    app = FastAPI()

    @app.get("/idle")
    async def idle() -> dict[str, int]:
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))
            await asyncio.sleep(IDLE)  # an external call, say, with the session still open
            await connection.execute(sa.text("SELECT 2"))
        return {"ok": 1}

    @app.get("/busy")
    async def busy() -> dict[str, int]:
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT pg_sleep(:s)"), {"s": IDLE})
        return {"ok": 1}

    @app.get("/items/{item_id}")
    async def read_item(item_id: int) -> dict[str, int]:
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))
        return {"id": item_id}

    @app.delete("/items/{item_id}")
    async def delete_item(item_id: int) -> dict[str, int]:
        async with engine.connect() as connection:
            for _ in range(3):
                await connection.execute(sa.text("SELECT 1"))
        return {"id": item_id}

    return app


def _client(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_held_idle_is_hold_time_outside_statements(
    engine: AsyncEngine, registry: CollectorRegistry, recorded: list[Event]
) -> None:
    app = _app(engine)
    poolwatch.instrument(app, engine, registry=registry, name="idle", held_idle_seconds=HELD_IDLE_SECONDS)
    async with _client(app) as client:
        started = time.perf_counter()
        assert (await client.get("/idle")).status_code == 200
        idle_request = time.perf_counter() - started
        assert (await client.get("/busy")).status_code == 200
    samples = scrape(registry)

    idle = samples.value("poolwatch_held_idle_seconds_sum", pool="idle", route="/idle")
    held = samples.value("poolwatch_use_seconds_sum", pool="idle", route="/idle", method="GET")
    assert IDLE <= idle <= held <= idle_request
    assert samples.value("poolwatch_held_idle_seconds_bucket", pool="idle", route="/idle", le="0.5") == 0
    assert samples.value("poolwatch_held_idle_seconds_count", pool="idle", route="/idle") == 1

    busy_idle = samples.value("poolwatch_held_idle_seconds_sum", pool="idle", route="/busy")
    busy_held = samples.value("poolwatch_use_seconds_sum", pool="idle", route="/busy", method="GET")
    assert busy_held >= IDLE
    assert busy_idle < HELD_IDLE_SECONDS  # the second went to pg_sleep, inside the statement
    assert samples.value("poolwatch_held_idle_seconds_bucket", pool="idle", route="/busy", le="0.5") == 1

    [event] = [e for e in recorded if isinstance(e, HeldIdle)]
    assert (event.pool, event.route, event.method, event.statements) == ("idle", "/idle", "GET", 2)
    assert IDLE <= event.seconds_idle <= event.seconds_held
    assert event.threshold_seconds == HELD_IDLE_SECONDS
    # The site may be shown relative to the application's root.
    assert __file__.endswith(event.site.rsplit(":", 1)[0]) and event.function.endswith("idle")
    fields = event.fields()
    assert fields["route"] == "/idle" and fields["seconds_idle"] >= IDLE


async def test_held_idle_off_logs_nothing_but_still_measures(
    engine: AsyncEngine, registry: CollectorRegistry, recorded: list[Event]
) -> None:
    app = _app(engine)
    poolwatch.instrument(app, engine, registry=registry, name="off", held_idle_seconds=0)
    async with _client(app) as client:
        assert (await client.get("/idle")).status_code == 200
    assert not [e for e in recorded if isinstance(e, HeldIdle)]
    assert scrape(registry).value("poolwatch_held_idle_seconds_sum", pool="off", route="/idle") >= IDLE


async def test_methods_of_one_route_are_apart(engine: AsyncEngine, registry: CollectorRegistry) -> None:
    app = _app(engine)
    poolwatch.instrument(app, engine, registry=registry, name="verbs")
    async with _client(app) as client:
        for _ in range(2):
            assert (await client.get("/items/7")).status_code == 200
        assert (await client.delete("/items/7")).status_code == 200
        # A method HTTP does not register is OTHER: clients cannot add series.
        assert (await client.request("BREW", "/items/7")).status_code == 405
        assert (await client.request("FROB", "/items/7")).status_code == 405
    samples = scrape(registry)
    route = "/items/{item_id}"
    assert samples.value("poolwatch_use_seconds_count", pool="verbs", route=route, method="GET") == 2
    assert samples.value("poolwatch_use_seconds_count", pool="verbs", route=route, method="DELETE") == 1
    assert samples.value("poolwatch_request_queries_sum", route=route, method="GET") == 2
    assert samples.value("poolwatch_request_queries_sum", route=route, method="DELETE") == 3
    assert samples.total("poolwatch_request_queries_count", method="OTHER") == 2
    methods = {labels["method"] for labels, _ in samples.find("poolwatch_request_queries_count")}
    assert methods == {"GET", "DELETE", "OTHER"}


async def test_a_timeout_names_the_route_that_gave_up(
    async_url: str, registry: CollectorRegistry, recorded: list[Event]
) -> None:
    engine = create_async_engine(async_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    app = FastAPI()

    @app.get("/reports/{report_id}")
    async def report(report_id: int) -> dict[str, int]:
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))
        return {"id": report_id}

    poolwatch.instrument(app, engine, registry=registry, name="gave-up")
    try:
        async with engine.connect() as held, _client(app) as client:
            await held.execute(sa.text("SELECT 1"))
            assert (await client.get("/reports/1")).status_code == 500
        samples = scrape(registry)
        assert samples.value("poolwatch_timeouts_total", pool="gave-up", route="/reports/{report_id}") == 1
        assert samples.value("poolwatch_timeouts_total", pool="gave-up", route="<none>") == 0
        [timeout] = [e for e in recorded if isinstance(e, PoolTimeout)]
        assert timeout.route == "/reports/{report_id}" and timeout.fields()["route"] == timeout.route
    finally:
        await engine.dispose()


def _refused_port() -> int:
    """A loopback port that was just free: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_failed_connects_are_counted_by_error(sync_url: str, registry: CollectorRegistry) -> None:
    url = sa.make_url(sync_url).set(host="127.0.0.1", port=_refused_port())
    engine = sa.create_engine(url, pool_size=1, max_overflow=0)
    poolwatch.watch(engine, registry=registry, name="refused")
    for _ in range(3):
        with pytest.raises(sa.exc.OperationalError):
            engine.connect()
    samples = scrape(registry)
    errors = samples.find("poolwatch_connect_errors_total", pool="refused")
    assert errors == [({"pool": "refused", "error": "OperationalError"}, 3.0)]
    assert samples.value("poolwatch_connects_total", pool="refused") == 0
    # Only the wait histogram moved before: now "cannot connect" and "pool too small" differ.
    assert samples.value("poolwatch_wait_seconds_count", pool="refused") == 3
    assert samples.total("poolwatch_timeouts_total", pool="refused") == 0
    engine.dispose()


def test_a_leak_says_how_long_it_ran_statements(sync_url: str, registry: CollectorRegistry) -> None:
    taken: list[Event] = []
    previous = events.set_sinks([taken.append])
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0)
    try:
        poolwatch.watch(engine, registry=registry, name="leaky", leak_threshold_seconds=0.3)
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT pg_sleep(0.1)"))
            connection.execute(sa.text("SELECT 1"))
            time.sleep(0.5)
    finally:
        events.set_sinks(previous)
        engine.dispose()
    leaks = [e for e in taken if isinstance(e, LeakDetected)]
    assert len(leaks) == 1
    [leak] = leaks
    assert leak.statements == 2
    assert 0.1 <= leak.seconds_in_statements < leak.seconds_held
    assert leak.fields()["seconds_in_statements"] >= 0.1


# What each driver says when the server refuses the start-up: asyncpg raises a class per SQLSTATE
# (under SQLAlchemy's adapted Error), psycopg raises OperationalError (libpq gives no SQLSTATE for
# a failed connect, so that is psycopg's own, most specific class there).
CONNECT_REFUSALS = [
    ("asyncpg", "database", "InvalidCatalogNameError"),
    ("asyncpg", "username", "InvalidAuthorizationSpecificationError"),
    ("psycopg", "database", "OperationalError"),
    ("psycopg", "username", "OperationalError"),
]


@pytest.mark.parametrize(("driver", "wrong", "error"), CONNECT_REFUSALS)
async def test_failed_connects_are_labelled_with_the_drivers_class(
    postgres_url: str, registry: CollectorRegistry, driver: str, wrong: str, error: str
) -> None:
    url = sa.make_url(postgres_url).set(drivername=f"postgresql+{driver}")
    if wrong == "database":
        url = url.set(database="poolwatch_no_such_database")
    else:
        url = url.set(username="poolwatch_no_such_user")
    name = f"{driver}-{wrong}"
    if driver == "asyncpg":
        async_engine = create_async_engine(url, pool_size=1, max_overflow=0)
        poolwatch.watch(async_engine, registry=registry, name=name)
        try:
            for _ in range(2):
                with pytest.raises(sa.exc.DBAPIError):
                    async with async_engine.connect():
                        pass
        finally:
            await async_engine.dispose()
    else:
        engine = sa.create_engine(url, pool_size=1, max_overflow=0)
        poolwatch.watch(engine, registry=registry, name=name)
        try:
            for _ in range(2):
                with pytest.raises(sa.exc.OperationalError):
                    engine.connect()
        finally:
            engine.dispose()
    errors = scrape(registry).find("poolwatch_connect_errors_total", pool=name)
    assert errors == [({"pool": name, "error": error}, 2.0)]
