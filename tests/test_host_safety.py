"""poolwatch never changes what SQLAlchemy does and respects the application's shape.

Copies and derived engines, a reassigned creator, minimal dialects, app factories, an application's
own ``/metrics``, mounted apps: each of these once made poolwatch alter or break its host.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
import structlog
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, make_asgi_app
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from structlog.testing import LogCapture, capture_logs

import poolwatch
from poolwatch._capture.pool_hooks import recorder_of
from tests.fault_fixtures import SERVINGS, Serving, proxied, proxy, sync_client_of  # noqa: F401 - a fixture
from tests.metrics import scrape
from tests.proxy import FaultProxy

# -- SQLAlchemy's behaviour unchanged --------------------------------------------------------------


def test_disposing_a_copy_leaves_the_original_pool_alone(sync_url: str, registry: CollectorRegistry) -> None:
    """SQLAlchemy's own test_close_parameter: a copy's dispose() never reaches the original."""
    engine = sa.create_engine(sync_url, pool_size=2)
    poolwatch.watch(engine, registry=registry, name="orig")
    original_pool = engine.pool
    duplicate = copy.copy(engine)
    duplicate.dispose(close=False)
    assert engine.pool is original_pool, "the original engine lost its pool"
    assert duplicate.pool is not original_pool
    # The copy now has a pool of its own, which nobody watches: the original counts only its own.
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
    with duplicate.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
    samples = scrape(registry)
    assert samples.value("poolwatch_checkouts_total", pool="orig") == 1
    assert samples.value("poolwatch_checkins_total", pool="orig") == 1
    assert samples.value("poolwatch_connects_total", pool="orig") == 1
    assert recorder_of(duplicate.pool) is None
    assert "dispose" not in engine.__dict__
    # The original's own dispose() and a derived engine's: the new pool is the watched one.
    engine.dispose()
    engine.execution_options(isolation_level="AUTOCOMMIT").dispose()
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
    assert scrape(registry).value("poolwatch_checkouts_total", pool="orig") == 2
    assert recorder_of(engine.pool) is not None
    duplicate.dispose()
    engine.dispose()


def test_a_copy_disposed_then_watched_before_its_first_checkout_counts_its_own(
    sync_url: str, registry: CollectorRegistry
) -> None:
    """The copy's new pool still waits for its first checkout to tell whose it is when the copy is
    watched itself: each engine then counts its own checkouts, and the copy's work never fails
    (its hooks once took the waiting wrapper for SQLAlchemy's ``connect``: a RecursionError)."""
    engine = sa.create_engine(sync_url, pool_size=1)
    watch = poolwatch.watch(engine, registry=registry, name="orig")
    duplicate = copy.copy(engine)
    duplicate.dispose()
    other = poolwatch.watch(duplicate, registry=registry, name="copy")
    try:
        for _ in range(2):
            with duplicate.connect() as connection:
                assert connection.execute(sa.text("SELECT 1")).scalar() == 1
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        duplicate.dispose()  # the copy's own dispose: its next pool is still its own
        with duplicate.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        samples = scrape(registry)
        assert samples.value("poolwatch_checkouts_total", pool="copy") == 3
        assert samples.value("poolwatch_checkouts_total", pool="orig") == 1
        assert recorder_of(duplicate.pool) is not recorder_of(engine.pool)
    finally:
        other.close()
        watch.close()
        duplicate.dispose()
        engine.dispose()


def test_execution_options_engine_is_the_same_pool_counted_once(
    sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=2)
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    with capture_logs() as events:
        watch = poolwatch.watch(engine, autocommit, registry=registry, leak_threshold_seconds=0.3)
        assert len(watch.recorders) == 1  # one pool, one recorder, under one name
        with pytest.raises(ValueError, match="already watched as"):
            poolwatch.watch({"other": autocommit}, registry=registry)  # two names, one registry
        # In a registry of its own, a second name is an alias: the same pool, counted once.
        elsewhere = CollectorRegistry()
        alias = poolwatch.watch({"other": autocommit}, registry=elsewhere)
        assert alias.recorders == watch.recorders
        with autocommit.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        # Past the leak threshold, a phantom checkout would show in the gauge and a sweep (run
        # here, not left to the sweeper's timing) would flag it.
        time.sleep(0.4)
        watch.recorders[0].sweep()
    name = watch.pool_names[0]
    samples = scrape(registry)
    assert samples.value("poolwatch_leaked_connections", pool=name) == 0
    assert samples.value("poolwatch_checkouts_total", pool=name) == 2
    assert samples.value("poolwatch_connections", pool=name, state="used") == 0
    assert scrape(elsewhere).value("poolwatch_checkouts_total", pool="other") == 2
    assert [e for e in events if e["event"].startswith("poolwatch.leak")] == []
    engine.dispose()


def test_reassigned_creator_still_counts_every_connection(sync_url: str, registry: CollectorRegistry) -> None:
    engine = sa.create_engine(sync_url, poolclass=sa.pool.NullPool)
    poolwatch.watch(engine, registry=registry, name="creator")
    url = sync_url.replace("postgresql+psycopg://", "postgresql://")
    opened: list[int] = []

    def creator() -> Any:
        opened.append(1)
        return psycopg.connect(url)

    for index in range(4):
        if index == 2:
            engine.pool._creator = creator  # SQLAlchemy's setter rebuilds _invoke_creator
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    assert len(opened) == 2
    samples = scrape(registry)
    assert samples.value("poolwatch_connects_total", pool="creator") == 4
    assert samples.value("poolwatch_connect_seconds_count", pool="creator") == 4
    assert samples.total("poolwatch_disconnects_total", pool="creator") == 4
    engine.dispose()


class _MinimalDialect(DefaultDialect):
    """A third-party dialect as small as SQLAlchemy allows: no ``driver`` of its own."""

    name = "minimal"
    supports_statement_cache = True

    @classmethod
    def import_dbapi(cls) -> Any:
        import sqlite3

        return sqlite3


def test_engine_with_a_dialect_without_driver_is_watched(tmp_path: Any, registry: CollectorRegistry) -> None:
    sa.dialects.registry.register("minimal", __name__, "_MinimalDialect")
    engine = sa.create_engine(f"minimal:///{tmp_path / 'db.sqlite'}")
    del_driver = "driver" in type(engine.dialect).__dict__
    assert (not del_driver and not hasattr(engine.dialect, "driver")) or engine.dialect.driver is None
    poolwatch.watch(engine, registry=registry, name="minimal")
    with engine.connect() as connection:
        connection.exec_driver_sql("SELECT 1")
    info = scrape(registry).find("poolwatch_pool_info", pool="minimal")
    assert [labels["driver"] for labels, _ in info] == ["unknown"]
    engine.dispose()


def test_not_an_engine_is_a_type_error_naming_it(registry: CollectorRegistry) -> None:
    with pytest.raises(TypeError, match=r"got builtins\.str"):
        poolwatch.watch("postgresql://localhost/db", registry=registry)


# -- the application's shape respected -------------------------------------------------------------


def _factory_app(sync_url: str, registry: CollectorRegistry) -> tuple[FastAPI, sa.Engine]:
    app = FastAPI()
    engine = sa.create_engine(sync_url, pool_size=1)

    @app.get("/one")
    def one() -> int:
        with engine.connect() as connection:
            return int(connection.execute(sa.text("SELECT 1")).scalar_one())

    poolwatch.instrument(app, engine, registry=registry)  # default name, never closed
    return app, engine


@pytest.mark.parametrize("serving", SERVINGS)
def test_app_factory_instruments_again_and_again(sync_url: str, serving: Serving) -> None:
    registry = CollectorRegistry()  # shared by every app, like the default registry
    engines = []
    for _ in range(3):
        app, engine = _factory_app(sync_url, registry)
        with sync_client_of(app, serving) as client:
            assert client.get("/one").json() == 1
            assert client.get("/metrics").status_code == 200
        engines.append(engine)
        del app, client
    # The newest app's pool is the one exported, counted from its own start.
    [(_labels, value)] = scrape(registry).find("poolwatch_checkouts_total")
    assert value == 1
    # Once the old apps are collected, their instrumentations are released with them.
    gc.collect()
    app, engine = _factory_app(sync_url, registry)
    hooked = [recorder_of(old.pool) is not None for old in engines]
    assert hooked == [False, False, False]
    for old in engines:
        old.dispose()
    engine.dispose()
    del app


@pytest.mark.parametrize("serving", SERVINGS)
def test_instrument_on_a_started_app_leaves_nothing_behind(
    sync_url: str, registry: CollectorRegistry, serving: Serving
) -> None:
    app = FastAPI()
    engine = sa.create_engine(sync_url, pool_size=1)
    with sync_client_of(app, serving) as client:
        client.get("/")
        with pytest.raises(RuntimeError, match="after an application has started"):
            poolwatch.instrument(app, engine, registry=registry)
    assert recorder_of(engine.pool) is None
    assert list(registry.collect()) == []
    engine.dispose()


def test_a_new_name_for_a_watched_engine_is_refused_not_dropped(
    sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1)
    watch = poolwatch.watch(engine, registry=registry, name="first")
    with pytest.raises(ValueError, match="already watched as 'first'"):
        poolwatch.watch(engine, registry=registry, name="second")
    assert watch.pool_names == ["first"]
    # Honoured where it counts nothing twice: another registry exports it as "second".
    other = CollectorRegistry()
    poolwatch.watch(engine, registry=other, name="second")
    assert [labels["pool"] for labels, _ in scrape(other).find("poolwatch_pool_info")] == ["second"]
    engine.dispose()


def _metrics_app(registry: CollectorRegistry, app_registry: CollectorRegistry, **settings: Any) -> FastAPI:
    app = FastAPI()
    app.mount("/metrics", make_asgi_app(registry=app_registry))
    return app


@pytest.mark.parametrize("serving", SERVINGS)
def test_the_applications_own_metrics_endpoint_is_never_hidden(
    sync_url: str, registry: CollectorRegistry, serving: Serving
) -> None:
    app_registry = CollectorRegistry()
    Counter("orders_placed", "Orders the app placed.", registry=app_registry).inc(3)
    app = FastAPI()
    app.mount("/metrics", make_asgi_app(registry=app_registry))
    engine = sa.create_engine(sync_url, pool_size=1)
    with capture_logs() as events:
        poolwatch.instrument(app, engine, registry=registry, name="own")
        with sync_client_of(app, serving) as client:
            for path in ("/metrics", "/metrics/"):
                body = client.get(path, follow_redirects=True).text
                assert "orders_placed_total 3.0" in body
                assert "poolwatch_checkouts_total" not in body  # a registry poolwatch does not use
    [warning] = [e for e in events if e["event"] == "poolwatch.path_taken"]
    assert warning["path"] == "/metrics" and warning["setting"] == "metrics_path"
    engine.dispose()


@pytest.mark.parametrize("serving", SERVINGS)
def test_metrics_path_none_serves_nothing_and_a_catch_all_route_hides_nothing(
    sync_url: str, registry: CollectorRegistry, serving: Serving
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1)
    app = FastAPI()

    @app.get("/{anything:path}")
    def fallback(anything: str) -> dict[str, str]:
        return {"app": anything}

    poolwatch.instrument(app, engine, registry=registry, name="off", metrics_path=None)
    with sync_client_of(app, serving) as client:
        assert client.get("/metrics").json() == {"app": "metrics"}
        assert client.get("/health/live").json() == {"status": "ok"}  # a catch-all claims nothing
    engine.dispose()


def test_empty_metrics_path_in_the_environment_means_none(
    monkeypatch: pytest.MonkeyPatch, sync_url: str, registry: CollectorRegistry
) -> None:
    monkeypatch.setenv("POOLWATCH_METRICS_PATH", "")
    engine = sa.create_engine(sync_url, pool_size=1)
    watch = poolwatch.watch(engine, registry=registry, name="env")
    assert watch.settings.metrics_path is None
    watch.close()
    engine.dispose()


@pytest.mark.parametrize("serving", SERVINGS)
def test_instrumenting_a_mounted_sub_app_serves_under_the_mount(
    sync_url: str, registry: CollectorRegistry, serving: Serving
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1)
    sub = FastAPI()

    @sub.get("/items/{item_id}")
    def item(item_id: int) -> int:
        with engine.connect() as connection:
            return int(connection.execute(sa.text("SELECT :x"), {"x": item_id}).scalar_one())

    poolwatch.instrument(sub, engine, registry=registry, name="sub")
    app = FastAPI()
    app.mount("/sub", sub)
    with sync_client_of(app, serving) as client:
        assert client.get("/sub/items/7").json() == 7
        metrics = client.get("/sub/metrics")
        assert metrics.status_code == 200 and "poolwatch_checkouts_total" in metrics.text
        assert client.get("/sub/health/live").json() == {"status": "ok"}
        assert client.get("/sub/health/db").json() == {"status": "ok"}
        assert client.get("/metrics").status_code == 404  # only under the mount
    routes = {labels["route"] for labels, _ in scrape(registry).find("poolwatch_use_seconds_count")}
    assert "/sub/items/{item_id}" in routes
    engine.dispose()


@pytest.mark.parametrize("serving", SERVINGS)
def test_a_raw_asgi_app_mounted_in_fastapi_files_checkouts_under_the_mount(
    sync_url: str, registry: CollectorRegistry, serving: Serving
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1)

    async def graphql(scope: Any, receive: Any, send: Any) -> None:
        def query() -> None:
            with engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))

        await asyncio.to_thread(query)
        await PlainTextResponse("ok")(scope, receive, send)

    app = FastAPI()
    app.mount("/graphql", graphql)
    poolwatch.instrument(app, engine, registry=registry, name="raw")
    with sync_client_of(app, serving) as client:
        assert client.post("/graphql/").text == "ok"
        assert client.get("/docs").status_code == 200
        assert client.get("/openapi.json").status_code == 200
    samples = scrape(registry)
    routes = {labels["route"] for labels, _ in samples.find("poolwatch_use_seconds_count", pool="raw")}
    assert "/graphql/{path}" in routes and "<unmatched>" not in routes
    request_routes = {labels["route"] for labels, _ in samples.find("poolwatch_request_queries_count")}
    assert {"/docs", "/openapi.json"} <= request_routes
    assert "<unmatched>" not in request_routes
    engine.dispose()


@pytest.mark.parametrize("serving", SERVINGS)
def test_a_plain_starlette_app_works_too(
    sync_url: str, registry: CollectorRegistry, serving: Serving
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1)

    def users(request: Any) -> PlainTextResponse:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        return PlainTextResponse("ok")

    app = Starlette(routes=[Mount("/api", routes=[Route("/users/{id}", users)])])
    poolwatch.instrument(app, engine, registry=registry, name="plain")
    with sync_client_of(app, serving) as client:
        assert client.get("/api/users/3").text == "ok"
    routes = {labels["route"] for labels, _ in scrape(registry).find("poolwatch_use_seconds_count")}
    assert "/api/users/{id}" in routes
    engine.dispose()


# -- counts that tell the truth ------------------------------------------------------------------


LEAKS = 25
THRESHOLD = 0.2


def test_every_checkout_held_past_the_threshold_is_one_leak_sync(
    sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=LEAKS, max_overflow=0)
    poolwatch.watch(engine, registry=registry, name="leaks", leak_threshold_seconds=THRESHOLD)
    barrier = threading.Barrier(LEAKS)

    def hold(index: int) -> None:
        with engine.connect():
            barrier.wait()
            # Spread the returns across sweeps: some between two sweeps, some after one.
            time.sleep(THRESHOLD + 0.01 + 0.013 * index)

    with capture_logs() as events:
        threads = [threading.Thread(target=hold, args=(i,)) for i in range(LEAKS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert scrape(registry).value("poolwatch_leaks_total", pool="leaks", route="<none>") == LEAKS
    assert len([e for e in events if e["event"] == "poolwatch.leak_detected"]) == LEAKS
    assert len([e for e in events if e["event"] == "poolwatch.leak_returned"]) == LEAKS
    engine.dispose()


async def test_every_checkout_held_past_the_threshold_is_one_leak_async(
    async_url: str, registry: CollectorRegistry
) -> None:
    engine = create_async_engine(async_url, pool_size=LEAKS, max_overflow=0)
    poolwatch.watch(engine, registry=registry, name="leaks", leak_threshold_seconds=THRESHOLD)

    async def hold(index: int) -> None:
        async with engine.connect():
            await asyncio.sleep(THRESHOLD + 0.01 + 0.013 * index)

    await asyncio.gather(*(hold(i) for i in range(LEAKS)))
    assert scrape(registry).value("poolwatch_leaks_total", pool="leaks", route="<none>") == LEAKS
    await engine.dispose()


async def test_cancelled_pre_ping_is_not_a_pre_ping_failure(
    postgres_url: str,
    proxy: FaultProxy,  # noqa: F811 - the fixture
    registry: CollectorRegistry,
) -> None:
    engine = create_async_engine(proxied(postgres_url, proxy, "asyncpg"), pool_size=10, pool_pre_ping=True)
    poolwatch.watch(engine, registry=registry, name="cancel")
    connections = [await engine.connect() for _ in range(10)]  # ten live pooled connections
    for connection in connections:
        await connection.close()
    proxy.mode = "stall"  # the pings now wait for an answer that does not come

    async def checkout() -> None:
        async with engine.connect():
            pass

    with capture_logs() as events:
        tasks = [asyncio.create_task(checkout()) for _ in range(10)]
        deadline = time.monotonic() + 10
        while scrape(registry).value("poolwatch_connections_pinging", pool="cancel") < 10:
            assert time.monotonic() < deadline, "the checkouts never reached their pre-ping"
            await asyncio.sleep(0.02)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    proxy.mode = "pass"
    assert all(task.cancelled() for task in tasks)
    assert scrape(registry).value("poolwatch_pre_ping_failures_total", pool="cancel") == 0
    assert [e for e in events if e["event"] == "poolwatch.pre_ping_failed"] == []
    await engine.dispose()


async def test_a_killed_asyncpg_backend_is_named_by_its_driver_error(
    async_url: str, sync_url: str, registry: CollectorRegistry
) -> None:
    engine = create_async_engine(async_url, pool_size=1)
    poolwatch.watch(engine, registry=registry, name="killed")
    async with engine.connect() as connection:
        pid = (await connection.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
    admin = sa.create_engine(sync_url)
    with admin.connect() as connection:
        connection.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    with pytest.raises(sa.exc.DBAPIError):
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))
    reasons = {labels["reason"] for labels, _ in scrape(registry).find("poolwatch_invalidations_total")}
    assert reasons and "Error" not in reasons
    assert reasons <= {"ConnectionDoesNotExistError", "InterfaceError", "ConnectionResetError"}, reasons
    admin.dispose()
    await engine.dispose()


# -- context kept ------------------------------------------------------------------------------


@pytest.fixture
def structlog_with_contextvars() -> Iterator[LogCapture]:
    capture = LogCapture()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
    try:
        yield capture
    finally:
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()


def test_leak_detected_by_the_sweeper_keeps_the_context_of_the_checkout(
    sync_url: str, registry: CollectorRegistry, structlog_with_contextvars: LogCapture
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1)
    poolwatch.watch(engine, registry=registry, name="ctx", leak_threshold_seconds=0.2)
    structlog.contextvars.bind_contextvars(request_id="req-42")
    with engine.connect():
        structlog.contextvars.clear_contextvars()  # the checkout's context is what counts
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _events(structlog_with_contextvars, "leak_detected"):
            time.sleep(0.02)
    [detected] = _events(structlog_with_contextvars, "leak_detected")
    assert detected["request_id"] == "req-42"
    [returned] = _events(structlog_with_contextvars, "leak_returned")
    assert returned["request_id"] == "req-42"
    engine.dispose()


def _events(capture: LogCapture, name: str) -> list[dict[str, Any]]:
    return [e for e in capture.entries if e["event"] == f"poolwatch.{name}"]
