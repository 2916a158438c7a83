"""Pool metrics core against real PostgreSQL: gauges, counters, waits, timeouts, pool kinds."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg, PGExecutionContext_psycopg
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool
from structlog.testing import capture_logs

import poolwatch
from poolwatch._capture.pool_hooks import recorder_of
from poolwatch._log import internal_errors
from tests.fault_fixtures import wait_until, wait_until_async
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
    engine = sa.create_engine(sync_url, pool_size=2, max_overflow=1, pool_timeout=30)
    poolwatch.watch(engine, registry=registry, name="main")
    with NegativeWatcher(registry) as watcher:
        held = [engine.connect() for _ in range(3)]
        samples = scrape(registry)
        assert samples.value("poolwatch_connections", pool="main", state="used") == 3
        assert samples.value("poolwatch_connections_overflow", pool="main") == 1
        assert samples.value("poolwatch_connections_max", pool="main") == 3
        assert samples.value("poolwatch_pending_requests", pool="main") == 0

        # A fourth caller waits (pool_timeout is 30 s): pending reads 1 for as long as it does.
        served = threading.Event()

        def fourth_checkout() -> None:
            with engine.connect():
                served.set()

        waiter = threading.Thread(target=fourth_checkout)
        waiter.start()
        wait_until(
            lambda: scrape(registry).value("poolwatch_pending_requests", pool="main") == 1,
            10,
            "pending_requests never read 1 while the fourth caller waited",
        )
        # Scrapes keep coming while the pool is saturated: none of them may see a negative value.
        scrapes = watcher.scrapes
        wait_until(lambda: watcher.scrapes >= scrapes + 5, 10, "the watcher stopped scraping")
        assert not served.is_set()
        held.pop().close()  # its connection goes to the waiter
        waiter.join(10)
        assert served.is_set()
        assert scrape(registry).value("poolwatch_pending_requests", pool="main") == 0

        # Full again, and a caller that gives up: counted once, and logged while still waiting.
        held.append(engine.connect())
        engine.pool._timeout = 0.3  # type: ignore[attr-defined]
        with capture_logs() as events, pytest.raises(sa.exc.TimeoutError):
            engine.connect()
        [timeout_event] = [e for e in events if e["event"] == "poolwatch.pool_timeout"]
        assert timeout_event["pool"] == "main" and timeout_event["seconds_waited"] >= 0.3
        assert timeout_event["pool_size"] == 2 and timeout_event["overflow"] == 1
        assert timeout_event["max_overflow"] == 1 and timeout_event["checked_out"] == 3
        assert timeout_event["callers_waiting"] == 1
        after = scrape(registry)
        assert after.total("poolwatch_timeouts_total", pool="main") == 1
        assert after.value("poolwatch_pending_requests", pool="main") == 0
        # Three, the waiter's, the one taken again, and the one that timed out.
        assert after.value("poolwatch_wait_seconds_count", pool="main") == 6
        assert after.value("poolwatch_checkouts_total", pool="main") == 5
        assert after.value("poolwatch_wait_seconds_sum", pool="main") >= 0.3

        for connection in held:
            connection.close()
        assert used(registry, "main") == 0
        assert scrape(registry).value("poolwatch_connections_overflow", pool="main") == 0
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
    # The counts are lock-free ``+=`` statements (see poolwatch._record.histogram): switching
    # threads every microsecond makes a lost update near certain if one could happen in between.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    samples = scrape(registry)
    assert samples.value("poolwatch_checkouts_total", pool="threads") == 16000
    assert samples.value("poolwatch_checkins_total", pool="threads") == 16000
    assert samples.value("poolwatch_wait_seconds_count", pool="threads") == 16000
    assert (
        samples.value("poolwatch_use_seconds_count", pool="threads", route="<none>", method="<none>") == 16000
    )
    assert samples.value("poolwatch_pending_requests", pool="threads") == 0
    engine.dispose()


def test_pre_ping_replaces_terminated_connections(
    sync_url: str, postgres_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=2, pool_pre_ping=True)
    poolwatch.watch(engine, registry=registry, name="ping")
    with engine.connect() as connection:  # fresh: no ping
        pass
    with capture_logs() as events:
        for _ in range(3):  # a pooled connection that answers: pinged, never a failure
            with engine.connect() as connection:
                pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        for _ in range(2):  # twice its backend killed under it: two failures, two replacements
            with psycopg.connect(postgres_url, autocommit=True) as admin:
                # With a timeout, PostgreSQL answers once the backend is gone.
                assert admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone() == (True,)
            with engine.connect() as connection:
                pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    failed = [e for e in events if e["event"] == "poolwatch.pre_ping_failed"]
    # PostgreSQL says why before it closes the socket: psycopg's class for that message.
    assert [(e["pool"], e["error"]) for e in failed] == [("ping", "AdminShutdown")] * 2
    samples = scrape(registry)
    assert samples.value("poolwatch_pre_ping_failures_total", pool="ping") == 2
    # Each dead connection thrown away once, for the driver's reason: SQLAlchemy invalidates it
    # with its own stand-in (InvalidatePoolError), which says nothing an operator can act on.
    assert samples.find("poolwatch_invalidations_total", pool="ping") == [
        ({"pool": "ping", "reason": "AdminShutdown"}, 2.0)
    ]
    assert samples.value("poolwatch_connects_total", pool="ping") == 3
    engine.dispose()


def test_failed_statements_are_counted_by_operation_and_class_on_every_driver_call(
    sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1)
    engine.connect().close()  # the dialect's first-connect statements, before poolwatch
    poolwatch.watch(engine, registry=registry, name="errors")
    missing = "SELECT x FROM no_such_table_poolwatch WHERE x = %(x)s"
    calls = [
        lambda connection: connection.exec_driver_sql(missing, {"x": 1}),  # do_execute
        lambda connection: connection.exec_driver_sql(missing, [{"x": 1}, {"x": 2}]),  # do_executemany
        lambda connection: connection.execution_options(no_parameters=True).exec_driver_sql(
            "SELECT x FROM no_such_table_poolwatch"
        ),  # do_execute_no_params
    ]
    for call in calls:
        with engine.connect() as connection, pytest.raises(sa.exc.ProgrammingError):
            call(connection)
    samples = scrape(registry)
    assert samples.find("poolwatch_query_errors_total") == [
        ({"pool": "errors", "operation": "SELECT", "error": "UndefinedTable"}, 3.0)
    ]
    # A statement that failed is counted as an error, not timed as a statement.
    assert samples.value("poolwatch_query_seconds_count", pool="errors", operation="SELECT") == 0
    engine.dispose()


def test_a_checkout_that_cannot_connect_is_a_wait_and_leaves_nobody_waiting(
    registry: CollectorRegistry,
) -> None:
    with socket.socket() as sock:  # a port nothing listens on: the connection is refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    engine = sa.create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/test", poolclass=NullPool)
    poolwatch.watch(engine, registry=registry, name="refused")
    for _ in range(2):
        with pytest.raises(sa.exc.OperationalError):
            engine.connect()
    samples = scrape(registry)
    assert samples.value("poolwatch_wait_seconds_count", pool="refused") == 2
    assert samples.value("poolwatch_pending_requests", pool="refused") == 0
    assert samples.total("poolwatch_timeouts_total", pool="refused") == 0
    assert samples.value("poolwatch_checkouts_total", pool="refused") == 0
    engine.dispose()


def test_closing_a_watch_puts_the_engine_back_as_sqlalchemy_made_it(
    sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1)
    pristine_pool, pristine_dialect = set(vars(engine.pool)), set(vars(engine.dialect))
    watch = poolwatch.watch(engine, registry=registry, name="closed")
    assert recorder_of(engine.pool) is watch.recorders[0]
    watch.close()
    assert recorder_of(engine.pool) is None
    assert set(vars(engine.pool)) == pristine_pool
    assert set(vars(engine.dialect)) == pristine_dialect
    # Watched again elsewhere: each checkout and statement counted once, by the new watch only.
    again = CollectorRegistry()
    poolwatch.watch(engine, registry=again, name="again")
    with engine.connect() as connection:
        selects = scrape(again).value("poolwatch_query_seconds_count", pool="again", operation="SELECT")
        connection.execute(sa.text("SELECT 1"))
    samples = scrape(again)
    assert samples.value("poolwatch_checkouts_total", pool="again") == 1
    assert samples.value("poolwatch_query_seconds_count", pool="again", operation="SELECT") == selects + 1
    assert scrape(registry).find("poolwatch_checkouts_total") == []  # the closed watch left it
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
    ((info, value),) = samples.find("poolwatch_pool_info", pool=name)
    assert (info["pool_class"], info["driver"], value) == ("AsyncAdaptedQueuePool", "asyncpg", 1)
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
        selects = scrape(registry).value("poolwatch_query_seconds_count", pool="replica", operation="SELECT")
        connection.execute(sa.text("SELECT 1"))
        connection.execute(sa.text("SELECT 1"))
    samples = scrape(registry)
    pools = {labels["pool"] for labels, _ in samples.find("poolwatch_pool_info")}
    assert pools == {"primary", "replica"}
    assert samples.value("poolwatch_checkouts_total", pool="primary") == 1
    assert samples.value("poolwatch_checkouts_total", pool="replica") == 1
    assert samples.value("poolwatch_query_seconds_count", pool="replica", operation="SELECT") == selects + 2
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
    assert samples.total("poolwatch_disconnects_total", pool="null") == 3


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
    selects = scrape(registry).value("poolwatch_query_seconds_count", pool="disposed", operation="SELECT")
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
        with pytest.raises(sa.exc.TimeoutError):
            engine.connect()  # the new pool is full: its wait and timeout must be seen
        assert used(registry, "disposed") == 1
    samples = scrape(registry)
    assert samples.value("poolwatch_checkouts_total", pool="disposed") == 2
    assert samples.value("poolwatch_checkins_total", pool="disposed") == 2
    assert samples.total("poolwatch_timeouts_total", pool="disposed") == 1
    assert samples.value("poolwatch_wait_seconds_sum", pool="disposed") >= 0.2
    assert samples.value("poolwatch_query_seconds_count", pool="disposed", operation="SELECT") == selects + 1
    engine.dispose()


def test_series_exist_as_zeros_from_the_start(sync_url: str, registry: CollectorRegistry) -> None:
    engine = sa.create_engine(sync_url)
    errors_before = internal_errors.count  # process-wide: whatever earlier tests provoked
    poolwatch.watch(engine, registry=registry, name="fresh")
    samples = scrape(registry)
    for counter in (
        "poolwatch_checkouts_total", "poolwatch_checkins_total", "poolwatch_connects_total",
        "poolwatch_checkouts_queued_total",
        "poolwatch_pre_ping_failures_total", "poolwatch_wait_seconds_count",
        "poolwatch_connect_seconds_count", "poolwatch_pending_requests",
        "poolwatch_connections_overflow",
    ):  # fmt: skip
        assert samples.value(counter, pool="fresh") == 0, counter
    assert samples.value("poolwatch_use_seconds_count", pool="fresh", route="<none>", method="<none>") == 0
    assert samples.value("poolwatch_held_idle_seconds_count", pool="fresh", route="<none>") == 0
    assert samples.value("poolwatch_timeouts_total", pool="fresh", route="<none>") == 0
    for reason in ("recycled", "invalidated", "overflow", "reset_failed", "disposed", "other"):
        assert samples.value("poolwatch_disconnects_total", pool="fresh", reason=reason) == 0, reason
    assert samples.value("poolwatch_waits_cancelled_total", pool="fresh", route="<none>") == 0
    for histogram in (
        "poolwatch_idle_in_transaction_seconds_count",
        "poolwatch_held_after_response_seconds_count",
    ):
        assert samples.value(histogram, pool="fresh", route="<none>") == 0, histogram
    assert samples.value("poolwatch_connections_max", pool="fresh") == 15
    # Watching and scraping cost no internal error, and the counter reports the process's count.
    assert samples.value("poolwatch_internal_errors_total") == internal_errors.count == errors_before


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
        engine = create_async_engine(async_url, pool_size=1, max_overflow=0, pool_timeout=30)
        poolwatch.watch(engine, registry=registry, name="async")
        async with engine.connect():
            # A second caller waits (pool_timeout is 30 s): pending reads 1 while it does.
            waiter = asyncio.create_task(engine.connect().start())
            await wait_until_async(
                lambda: scrape(registry).value("poolwatch_pending_requests", pool="async") == 1,
                10,
                "pending_requests never read 1 while the second caller waited",
            )
            assert not waiter.done()
        second = await waiter  # it got the connection the first gave back
        # Full again, and a caller that gives up: counted once.
        engine.sync_engine.pool._timeout = 0.3  # type: ignore[attr-defined]
        with pytest.raises(sa.exc.TimeoutError):
            await engine.connect().start()
        await second.close()
        samples = scrape(registry)
        assert samples.total("poolwatch_timeouts_total", pool="async") == 1
        assert samples.value("poolwatch_pending_requests", pool="async") == 0
        assert samples.value("poolwatch_checkouts_total", pool="async") == 2
        assert samples.value("poolwatch_wait_seconds_count", pool="async") == 3
        await engine.dispose()

    asyncio.run(scenario())


# -- the driver calls go through unchanged -----------------------------------------------------------


class RecordingDialect(PGDialect_psycopg):
    """SQLAlchemy's psycopg dialect, noting what each driver call receives from above it.

    poolwatch wraps these methods on the dialect instance; whatever SQLAlchemy passes must reach the
    dialect as it was sent. It can also answer a ping with False, as some dialects do for a dead
    connection instead of raising (psycopg raises).
    """

    supports_statement_cache = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.contexts: list[object] = []
        self.closes: list[tuple[str, bool]] = []  # ("close" or "terminate", had a connection)
        self.ping_answers = True

    def do_execute(self, cursor: Any, statement: Any, parameters: Any, context: Any = None) -> None:
        self.contexts.append(context)
        super().do_execute(cursor, statement, parameters, context)

    def do_executemany(self, cursor: Any, statement: Any, parameters: Any, context: Any = None) -> None:
        self.contexts.append(context)
        super().do_executemany(cursor, statement, parameters, context)

    def do_execute_no_params(self, cursor: Any, statement: Any, context: Any = None) -> None:
        self.contexts.append(context)
        super().do_execute_no_params(cursor, statement, context)

    def do_close(self, dbapi_connection: Any) -> None:
        self.closes.append(("close", dbapi_connection is not None))
        super().do_close(dbapi_connection)

    def do_terminate(self, dbapi_connection: Any) -> None:
        self.closes.append(("terminate", dbapi_connection is not None))
        super().do_terminate(dbapi_connection)

    def do_ping(self, dbapi_connection: Any) -> bool:
        return bool(super().do_ping(dbapi_connection)) and self.ping_answers


sa.dialects.registry.register("postgresql.poolwatch_recording", __name__, "RecordingDialect")


def recording_engine(sync_url: str, **options: Any) -> sa.Engine:
    url = sa.make_url(sync_url).set(drivername="postgresql+poolwatch_recording")
    engine = sa.create_engine(url, **options)
    engine.connect().close()  # the dialect's first connect, before poolwatch
    return engine


def test_each_driver_call_gets_the_execution_context_sqlalchemy_passed(
    sync_url: str, registry: CollectorRegistry
) -> None:
    engine = recording_engine(sync_url, pool_size=1)
    dialect = engine.dialect
    assert isinstance(dialect, RecordingDialect)
    poolwatch.watch(engine, registry=registry, name="passed")
    dialect.contexts.clear()
    with engine.connect() as connection:
        connection.exec_driver_sql("SELECT %(x)s", {"x": 1})  # do_execute
        connection.exec_driver_sql("SELECT %(x)s", [{"x": 1}, {"x": 2}])  # do_executemany
        connection.execution_options(no_parameters=True).exec_driver_sql("SELECT 1")  # no params
    assert [type(context) for context in dialect.contexts] == [PGExecutionContext_psycopg] * 3
    assert scrape(registry).value("poolwatch_query_seconds_count", pool="passed", operation="SELECT") == 3
    engine.dispose()


def test_a_ping_that_answers_false_is_a_pre_ping_failure(sync_url: str, registry: CollectorRegistry) -> None:
    engine = recording_engine(sync_url, pool_size=1, pool_pre_ping=True)
    dialect = engine.dialect
    assert isinstance(dialect, RecordingDialect)
    poolwatch.watch(engine, registry=registry, name="false")
    dialect.ping_answers = False
    with capture_logs() as events, engine.connect() as connection:
        dialect.ping_answers = True  # the fresh connection that replaced it is not pinged
        assert connection.exec_driver_sql("SELECT 1").scalar() == 1
    failed = [(e["pool"], e["error"]) for e in events if e["event"] == "poolwatch.pre_ping_failed"]
    assert failed == [("false", "PingReturnedFalse")]
    samples = scrape(registry)
    assert samples.value("poolwatch_pre_ping_failures_total", pool="false") == 1
    assert samples.value("poolwatch_connects_total", pool="false") == 1
    engine.dispose()


def test_connections_are_closed_as_sqlalchemy_asked_gently_or_hard(
    sync_url: str, registry: CollectorRegistry
) -> None:
    """A connection returned to a full pool is closed; an invalidated one is terminated."""
    engine = recording_engine(sync_url, pool_size=1, max_overflow=1)
    dialect = engine.dialect
    assert isinstance(dialect, RecordingDialect)
    poolwatch.watch(engine, registry=registry, name="closes")
    dialect.closes.clear()
    first, second = engine.connect(), engine.connect()  # the second is an overflow connection
    first.close()  # back in the pool
    second.close()  # the pool is full: closed
    assert dialect.closes == [("close", True)]
    third = engine.connect()
    third.invalidate()  # dead as far as the application knows: terminated
    third.close()
    # (psycopg's terminate is SQLAlchemy's default one, which closes.)
    assert dialect.closes == [("close", True), ("terminate", True), ("close", True)]
    assert scrape(registry).total("poolwatch_disconnects_total", pool="closes") == 2
    engine.dispose()
