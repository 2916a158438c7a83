"""/health/db never disturbs the application, whichever pool class SQLAlchemy gives it.

Each pool class SQLAlchemy ships is probed while the application holds and uses connections of
its own at the same moment; what the application does must come out exactly as without poolwatch.
SQLite files stand in for the classes made for SQLite (SingletonThreadPool, StaticPool), real
PostgreSQL for the rest.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
import sqlalchemy.pool
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import (
    AssertionPool,
    AsyncAdaptedQueuePool,
    NullPool,
    Pool,
    QueuePool,
    SingletonThreadPool,
    StaticPool,
)

import poolwatch
from poolwatch._serve.health import HealthEndpoints
from poolwatch._serve.probe import PROBE_ROUTE, never_probed
from tests.fault_fixtures import call, total, value
from tests.metrics import scrape

OK = (200, b'{"status":"ok"}')

# SQLAlchemy 2.0 also ships FallbackAsyncAdaptedQueuePool (an AsyncAdaptedQueuePool); 2.1 dropped it.
FALLBACK: type[Pool] | None = getattr(sqlalchemy.pool, "FallbackAsyncAdaptedQueuePool", None)
SYNC_PROBED: list[type[Pool]] = [QueuePool, NullPool]
ASYNC_PROBED: list[type[Pool]] = [AsyncAdaptedQueuePool, NullPool, *([FALLBACK] if FALLBACK else [])]
NEVER_PROBED: list[type[Pool]] = [SingletonThreadPool, StaticPool, AssertionPool]


def shipped_pool_classes() -> set[type[Pool]]:
    return {
        cls
        for cls in vars(sqlalchemy.pool).values()
        if isinstance(cls, type) and issubclass(cls, Pool) and cls is not Pool
    }


def test_every_pool_class_sqlalchemy_ships_has_a_decided_and_tested_probe() -> None:
    # A class added by a new SQLAlchemy fails here until someone decides how to probe it.
    assert shipped_pool_classes() == {*SYNC_PROBED, *ASYNC_PROBED, *NEVER_PROBED}
    for cls in NEVER_PROBED:
        assert never_probed(object.__new__(cls))
    for cls in {*SYNC_PROBED, *ASYNC_PROBED}:
        assert not never_probed(object.__new__(cls))


def probe_sync(health: HealthEndpoints) -> tuple[int, bytes]:
    return asyncio.run(call(health.db))


def probe_checkouts(registry: CollectorRegistry, pool: str) -> float:
    return value(registry, "poolwatch_use_seconds_count", pool=pool, route=PROBE_ROUTE, method="<none>")


def has_probe_series(registry: CollectorRegistry, pool: str) -> bool:
    return bool(scrape(registry).find("poolwatch_use_seconds_count", pool=pool, route=PROBE_ROUTE))


# -- classes that are never probed ---------------------------------------------------------------


def test_singleton_thread_pool_is_never_probed_from_a_thread_of_ours(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    # Past pool_size threads, SingletonThreadPool closes other threads' connections, in use or not;
    # a probe always runs on a thread of its own.
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'app.db'}", poolclass=SingletonThreadPool, pool_size=2)
    watch = poolwatch.watch(engine, registry=registry, name="singleton", health_cache_seconds=0)
    health = HealthEndpoints(watch)
    holding = threading.Barrier(3)
    probed = threading.Event()
    errors: list[BaseException] = []

    def application_thread() -> None:
        try:
            with engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
                holding.wait(10)
                probed.wait(10)
                connection.execute(sa.text("SELECT 1"))
        except BaseException as error:
            errors.append(error)
            holding.abort()

    threads = [threading.Thread(target=application_thread) for _ in range(2)]
    for thread in threads:
        thread.start()
    holding.wait(10)
    try:
        answers = [probe_sync(health) for _ in range(5)]
    finally:
        probed.set()
        for thread in threads:
            thread.join(10)
    assert errors == []
    assert answers == [OK] * 5
    # The application's two checkouts, and not one by a probe.
    assert value(registry, "poolwatch_checkouts_total", pool="singleton") == 2
    assert not has_probe_series(registry, "singleton")
    watch.close()
    engine.dispose()


def static_engine(path: Path, check_same_thread: bool) -> sa.Engine:
    engine = sa.create_engine(
        f"sqlite:///{path}", poolclass=StaticPool, connect_args={"check_same_thread": check_same_thread}
    )
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE t (x INTEGER)"))
    return engine


@pytest.mark.parametrize("check_same_thread", [False, True])
def test_static_pool_shared_connection_is_never_touched_by_a_probe(
    tmp_path: Path, registry: CollectorRegistry, check_same_thread: bool
) -> None:
    # One connection shared by every caller: a probe's check-in would roll back the transaction
    # the application has open on it, and a failed ping would invalidate it for everyone.
    engine = static_engine(tmp_path / "app.db", check_same_thread)
    watch = poolwatch.watch(engine, registry=registry, name="static", health_cache_seconds=0)
    health = HealthEndpoints(watch)
    with engine.connect() as connection:
        connection.execute(sa.text("INSERT INTO t VALUES (1)"))  # a transaction left open
        shared = connection.connection.dbapi_connection
        answers = [probe_sync(health) for _ in range(3)]
        connection.execute(sa.text("INSERT INTO t VALUES (2)"))
        connection.commit()
    with engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT count(*) FROM t")).scalar()
    assert answers == [OK] * 3
    assert rows == 2
    assert engine.pool.connection.dbapi_connection is shared  # type: ignore[attr-defined]
    assert total(registry, "poolwatch_invalidations_total", pool="static") == 0
    assert not has_probe_series(registry, "static")
    watch.close()
    engine.dispose()


async def test_async_static_pool_shared_connection_is_never_touched_by_a_probe(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", poolclass=StaticPool)
    async with engine.begin() as connection:
        await connection.execute(sa.text("CREATE TABLE t (x INTEGER)"))
    watch = poolwatch.watch(engine, registry=registry, name="static-async", health_cache_seconds=0)
    health = HealthEndpoints(watch)
    async with engine.connect() as connection:
        await connection.execute(sa.text("INSERT INTO t VALUES (1)"))  # a transaction left open
        answers = [await call(health.db) for _ in range(3)]
        await connection.execute(sa.text("INSERT INTO t VALUES (2)"))
        await connection.commit()
    async with engine.connect() as connection:
        rows = (await connection.execute(sa.text("SELECT count(*) FROM t"))).scalar()
    assert answers == [OK] * 3
    assert rows == 2
    assert total(registry, "poolwatch_invalidations_total", pool="static-async") == 0
    watch.close()
    await engine.dispose()


def test_assertion_pool_is_never_probed(sync_url: str, registry: CollectorRegistry) -> None:
    # One checkout at a time, and whoever asks second raises: a probe would fail while the
    # application holds the connection, and make the application's own checkout fail while it held it.
    engine = sa.create_engine(sync_url, poolclass=AssertionPool)
    watch = poolwatch.watch(engine, registry=registry, name="assertion", health_cache_seconds=0)
    health = HealthEndpoints(watch)
    with engine.connect() as connection:
        pid = connection.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        held = [probe_sync(health) for _ in range(3)]
        assert connection.execute(sa.text("SELECT pg_backend_pid()")).scalar() == pid

    stop = threading.Event()
    errors: list[BaseException] = []
    cycles = 0

    def application() -> None:
        nonlocal cycles
        while not stop.is_set():
            try:
                with engine.connect() as connection:
                    connection.execute(sa.text("SELECT 1"))
                cycles += 1
            except BaseException as error:
                errors.append(error)

    thread = threading.Thread(target=application)
    thread.start()
    try:
        cycling = [probe_sync(health) for _ in range(20)]
    finally:
        stop.set()
        thread.join(10)
    assert held == [OK] * 3
    assert cycling == [OK] * 20
    assert errors == []
    assert cycles > 0
    assert not has_probe_series(registry, "assertion")
    watch.close()
    engine.dispose()


# -- classes that are probed ---------------------------------------------------------------------

MARK = "SELECT set_config('poolwatch_test.mark', 'application', true)"  # lasts until the transaction ends
READ_MARK = "SELECT current_setting('poolwatch_test.mark', true)"


@pytest.mark.parametrize("pool_class", SYNC_PROBED, ids=lambda cls: cls.__name__)
def test_probes_leave_the_applications_connections_alone_sync(
    sync_url: str, registry: CollectorRegistry, pool_class: type[Pool]
) -> None:
    engine = sa.create_engine(sync_url, poolclass=pool_class)
    watch = poolwatch.watch(engine, registry=registry, name="probed", health_cache_seconds=0)
    health = HealthEndpoints(watch)
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        while not stop.is_set():
            try:
                with engine.begin() as connection:
                    connection.execute(sa.text("SELECT 1"))
            except BaseException as error:
                errors.append(error)

    with engine.connect() as held:
        held.execute(sa.text(MARK))
        pid = held.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        threads = [threading.Thread(target=churn) for _ in range(2)]
        for thread in threads:
            thread.start()
        try:
            answers = [probe_sync(health) for _ in range(10)]
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)
        # Same backend, its transaction still open with what the application set in it.
        assert held.execute(sa.text("SELECT pg_backend_pid()")).scalar() == pid
        assert held.execute(sa.text(READ_MARK)).scalar() == "application"
        held.rollback()
    assert answers == [OK] * 10
    assert errors == []
    assert total(registry, "poolwatch_invalidations_total", pool="probed") == 0
    assert probe_checkouts(registry, "probed") == 10  # really probed, each time
    watch.close()
    engine.dispose()


@pytest.mark.parametrize("pool_class", ASYNC_PROBED, ids=lambda cls: cls.__name__)
async def test_probes_leave_the_applications_connections_alone_async(
    async_url: str, registry: CollectorRegistry, pool_class: type[Pool]
) -> None:
    engine = create_async_engine(async_url, poolclass=pool_class)
    # The server limit read (off here) would file a checkout of its own under <probe> too.
    watch = poolwatch.watch(
        engine, registry=registry, name="probed", health_cache_seconds=0, server_connections_max="off"
    )
    health = HealthEndpoints(watch)
    stop = asyncio.Event()
    errors: list[BaseException] = []

    async def churn() -> None:
        while not stop.is_set():
            try:
                async with engine.begin() as connection:
                    await connection.execute(sa.text("SELECT 1"))
            except Exception as error:
                errors.append(error)

    async def scalar(connection: AsyncConnection, sql: str) -> object:
        return (await connection.execute(sa.text(sql))).scalar()

    async with engine.connect() as held:
        await held.execute(sa.text(MARK))
        pid = await scalar(held, "SELECT pg_backend_pid()")
        churners = [asyncio.create_task(churn()) for _ in range(2)]
        try:
            answers = [await call(health.db) for _ in range(10)]
        finally:
            stop.set()
            await asyncio.gather(*churners)
        assert await scalar(held, "SELECT pg_backend_pid()") == pid
        assert await scalar(held, READ_MARK) == "application"
        await held.rollback()
    assert answers == [OK] * 10
    assert errors == []
    assert total(registry, "poolwatch_invalidations_total", pool="probed") == 0
    assert probe_checkouts(registry, "probed") == 10
    watch.close()
    await engine.dispose()
