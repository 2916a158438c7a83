"""Pool metrics core against real PostgreSQL: gauges, counters, waits, timeouts, pool kinds."""

from __future__ import annotations

import asyncio
import threading
import time

import psycopg
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool
from structlog.testing import capture_logs

import poolwatch
from tests.metrics import scrape, scrape_openmetrics


def used(registry: CollectorRegistry, pool: str) -> float:
    return scrape(registry).value("poolwatch_connections", pool=pool, state="used")


class NegativeWatcher:
    """Scrapes continuously in a thread and remembers any negative sample it ever saw."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.negatives: list[tuple[str, dict[str, str], float]] = []
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for (name, labels), value in scrape(self.registry).items():
                if value < 0:
                    self.negatives.append((name, labels, value))
            self.scrapes += 1
            time.sleep(0.005)

    def __enter__(self) -> NegativeWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_saturated_pool_overflow_pending_and_timeout(sync_url: str, registry: CollectorRegistry) -> None:
    engine = sa.create_engine(sync_url, pool_size=2, max_overflow=1, pool_timeout=0.3)
    poolwatch.watch(engine, registry=registry, name="main")
    with NegativeWatcher(registry) as watcher:
        held = [engine.connect() for _ in range(3)]
        samples = scrape(registry)
        assert samples.value("poolwatch_connections", pool="main", state="used") == 3
        assert samples.value("poolwatch_connections_overflow", pool="main") == 1
        assert samples.value("poolwatch_connections_max", pool="main") == 3
        assert samples.value("poolwatch_pending_requests", pool="main") == 0
        timeouts_before = samples.value("poolwatch_timeouts_total", pool="main")

        outcome: list[BaseException] = []
        pending_seen: list[float] = []

        def fourth_checkout() -> None:
            try:
                engine.connect()
            except BaseException as error:  # the timeout we are waiting for
                outcome.append(error)

        waiter = threading.Thread(target=fourth_checkout)
        events = capture_logs()
        captured = events.__enter__()
        waiter.start()
        deadline = time.monotonic() + 0.25
        while time.monotonic() < deadline and not pending_seen:
            value = scrape(registry).value("poolwatch_pending_requests", pool="main")
            if value == 1:
                pending_seen.append(value)
            time.sleep(0.01)
        waiter.join()
        events.__exit__(None, None, None)

        [timeout_event] = [e for e in captured if e["event"] == "poolwatch.pool_timeout"]
        assert timeout_event["pool"] == "main" and timeout_event["seconds_waited"] >= 0.3
        assert timeout_event["pool_size"] == 2 and timeout_event["overflow"] == 1
        assert timeout_event["max_overflow"] == 1 and timeout_event["checked_out"] == 3
        assert timeout_event["callers_waiting"] == 1
        assert pending_seen == [1], "pending_requests never read 1 while the fourth caller waited"
        assert len(outcome) == 1 and isinstance(outcome[0], sa.exc.TimeoutError)
        after = scrape(registry)
        assert after.value("poolwatch_timeouts_total", pool="main") == timeouts_before + 1
        assert after.value("poolwatch_pending_requests", pool="main") == 0
        assert after.value("poolwatch_wait_seconds_count", pool="main") == 4
        assert after.value("poolwatch_wait_seconds_sum", pool="main") >= 0.3

        for connection in held:
            connection.close()
        assert used(registry, "main") == 0
        assert scrape(registry).value("poolwatch_connections_overflow", pool="main") == 0
    assert watcher.scrapes > 5
    assert watcher.negatives == []
    engine.dispose()


def test_exact_counts_under_threads(sync_url: str, registry: CollectorRegistry) -> None:
    engine = sa.create_engine(sync_url, pool_size=4, max_overflow=4, pool_timeout=30)
    poolwatch.watch(engine, registry=registry, name="threads")
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        for _ in range(2000):
            engine.pool.connect().close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    samples = scrape(registry)
    assert samples.value("poolwatch_checkouts_total", pool="threads") == 16000
    assert samples.value("poolwatch_checkins_total", pool="threads") == 16000
    assert samples.value("poolwatch_wait_seconds_count", pool="threads") == 16000
    assert samples.value("poolwatch_use_seconds_count", pool="threads", route="<none>") == 16000
    assert samples.value("poolwatch_pending_requests", pool="threads") == 0
    engine.dispose()


def test_pre_ping_replaces_terminated_connections(
    sync_url: str, postgres_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=2, pool_pre_ping=True)
    poolwatch.watch(engine, registry=registry, name="ping")
    with engine.connect() as connection:
        pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    time.sleep(0.1)
    with capture_logs() as events, engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT 1").scalar() == 1
    failed = [e for e in events if e["event"] == "poolwatch.pre_ping_failed"]
    assert failed and failed[0]["pool"] == "ping" and failed[0]["error"]
    samples = scrape(registry)
    assert samples.value("poolwatch_pre_ping_failures_total", pool="ping") >= 1
    reasons = samples.find("poolwatch_invalidations_total", pool="ping")
    assert reasons and all(labels["reason"] for labels, _ in reasons)
    assert sum(value for _, value in reasons) >= 1
    engine.dispose()


async def test_async_engine_passed_directly(async_url: str, registry: CollectorRegistry) -> None:
    engine = create_async_engine(async_url, pool_size=3)
    watch = poolwatch.watch(engine, registry=registry)
    [name] = watch.pool_names
    assert "postgres" not in name.split("/")[0], "the pool name must not carry the user name"
    async with engine.connect() as connection:
        await connection.execute(sa.text("SELECT 1"))
        assert used(registry, name) == 1
    samples = scrape(registry)
    assert samples.value("poolwatch_checkouts_total", pool=name) == 1
    assert samples.value("poolwatch_checkins_total", pool=name) == 1
    assert samples.value("poolwatch_connects_total", pool=name) == 1
    assert samples.value("poolwatch_query_seconds_count", pool=name, operation="SELECT") >= 1
    info = samples.find("poolwatch_pool_info", pool=name)
    assert info[0][0]["pool_class"] == "AsyncAdaptedQueuePool"
    assert info[0][0]["driver"] == "asyncpg"
    await engine.dispose()


async def test_two_engines_two_pools_and_no_double_counting(
    async_url: str, sync_url: str, registry: CollectorRegistry
) -> None:
    primary = create_async_engine(async_url)
    replica = sa.create_engine(sync_url)
    poolwatch.watch({"primary": primary, "replica": replica}, registry=registry)
    poolwatch.watch({"primary": primary}, registry=registry)  # again: must change nothing
    poolwatch.watch(primary, replica, registry=CollectorRegistry())  # elsewhere: still one hook
    async with primary.connect() as connection:
        await connection.execute(sa.text("SELECT 1"))
    with replica.connect() as connection:
        # The dialect's own first-connect statements count too; measure from after them.
        selects = scrape(registry).value(
            "poolwatch_query_seconds_count", pool="replica", operation="SELECT"
        )
        connection.execute(sa.text("SELECT 1"))
        connection.execute(sa.text("SELECT 1"))
    samples = scrape(registry)
    pools = {labels["pool"] for labels, _ in samples.find("poolwatch_pool_info")}
    assert pools == {"primary", "replica"}
    assert samples.value("poolwatch_checkouts_total", pool="primary") == 1
    assert samples.value("poolwatch_checkouts_total", pool="replica") == 1
    assert (
        samples.value("poolwatch_query_seconds_count", pool="replica", operation="SELECT")
        == selects + 2
    )
    await primary.dispose()
    replica.dispose()


def test_null_pool_counts_open_connections(sync_url: str, registry: CollectorRegistry) -> None:
    engine = sa.create_engine(sync_url, poolclass=NullPool)
    poolwatch.watch(engine, registry=registry, name="null")
    held = [engine.connect() for _ in range(3)]
    samples = scrape(registry)
    assert samples.value("poolwatch_connections", pool="null", state="used") == 3
    assert samples.value("poolwatch_connections", pool="null", state="idle") == 0
    assert samples.find("poolwatch_connections_max", pool="null") == []  # unbounded
    for connection in held:
        connection.close()
    samples = scrape(registry)
    assert samples.value("poolwatch_connections", pool="null", state="used") == 0
    assert samples.value("poolwatch_connects_total", pool="null") == 3
    assert samples.value("poolwatch_disconnects_total", pool="null") == 3


async def test_sqlite_through_aiosqlite(tmp_path, registry: CollectorRegistry) -> None:  # type: ignore[no-untyped-def]
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/demo.db")
    watch = poolwatch.watch(engine, registry=registry)
    [name] = watch.pool_names
    assert name.endswith("demo.db")
    async with engine.begin() as connection:
        await connection.execute(sa.text("CREATE TABLE t (x INTEGER)"))
        await connection.execute(sa.text("INSERT INTO t VALUES (1)"))
    samples = scrape(registry)
    assert samples.value("poolwatch_checkouts_total", pool=name) == 1
    assert samples.value("poolwatch_query_seconds_count", pool=name, operation="DDL") == 1
    assert samples.value("poolwatch_query_seconds_count", pool=name, operation="INSERT") == 1
    await engine.dispose()


def test_counting_goes_on_after_dispose(sync_url: str, registry: CollectorRegistry) -> None:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    poolwatch.watch(engine, registry=registry, name="disposed")
    with engine.connect():
        pass
    old_pool = engine.pool
    engine.dispose()
    assert engine.pool is not old_pool
    selects = scrape(registry).value(
        "poolwatch_query_seconds_count", pool="disposed", operation="SELECT"
    )
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
        with pytest.raises(sa.exc.TimeoutError):
            engine.connect()  # the new pool is full: its wait and timeout must be seen
        assert used(registry, "disposed") == 1
    samples = scrape(registry)
    assert samples.value("poolwatch_checkouts_total", pool="disposed") == 2
    assert samples.value("poolwatch_checkins_total", pool="disposed") == 2
    assert samples.value("poolwatch_timeouts_total", pool="disposed") == 1
    assert samples.value("poolwatch_wait_seconds_sum", pool="disposed") >= 0.2
    assert (
        samples.value("poolwatch_query_seconds_count", pool="disposed", operation="SELECT")
        == selects + 1
    )
    engine.dispose()


def test_series_exist_as_zeros_from_the_start(sync_url: str, registry: CollectorRegistry) -> None:
    engine = sa.create_engine(sync_url)
    poolwatch.watch(engine, registry=registry, name="fresh")
    samples = scrape(registry)
    for counter in (
        "poolwatch_checkouts_total", "poolwatch_checkins_total", "poolwatch_connects_total",
        "poolwatch_disconnects_total", "poolwatch_timeouts_total",
        "poolwatch_pre_ping_failures_total", "poolwatch_wait_seconds_count",
        "poolwatch_connect_seconds_count", "poolwatch_pending_requests",
        "poolwatch_connections_overflow",
    ):  # fmt: skip
        assert samples.value(counter, pool="fresh") == 0, counter
    assert samples.value("poolwatch_use_seconds_count", pool="fresh", route="<none>") == 0
    assert samples.value("poolwatch_connections_max", pool="fresh") == 15
    assert samples.value("poolwatch_internal_errors_total") >= 0


def test_openmetrics_and_text_agree_and_nothing_is_negative(
    sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url)
    poolwatch.watch(engine, registry=registry, name="formats")
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
    text = scrape(registry)
    openmetrics = scrape_openmetrics(registry)
    assert text.value("poolwatch_checkouts_total", pool="formats") == 1
    assert openmetrics.value("poolwatch_checkouts_total", pool="formats") == 1
    assert all(value >= 0 for _, value in text.items())
    assert all(value >= 0 for _, value in openmetrics.items())
    engine.dispose()


def test_async_pool_saturation_and_timeout(async_url: str, registry: CollectorRegistry) -> None:
    async def scenario() -> None:
        engine = create_async_engine(async_url, pool_size=1, max_overflow=0, pool_timeout=0.3)
        poolwatch.watch(engine, registry=registry, name="async")
        async with engine.connect():
            waiter = asyncio.create_task(engine.connect().start())
            await asyncio.sleep(0.1)
            assert scrape(registry).value("poolwatch_pending_requests", pool="async") == 1
            with pytest.raises(sa.exc.TimeoutError):
                await waiter
        samples = scrape(registry)
        assert samples.value("poolwatch_timeouts_total", pool="async") == 1
        assert samples.value("poolwatch_pending_requests", pool="async") == 0
        await engine.dispose()

    asyncio.run(scenario())
