"""The statement timer's reading of each driver's transaction state, exactly, on a fake clock.

Idle in a transaction is read from the driver after each statement (``_capture.transactions``):
libpq's status for psycopg, a flag for sqlite3, none at all for a driver poolwatch does not know.
What would fool it, each tested here:

- a driver with no reader inside a transaction (nothing is idle in one: poolwatch cannot tell);
- sqlite3's flag, which is set only once a write began a transaction (a read alone opens none);
- a connection of an unusual shape (the reader's attribute missing): one internal error, then the
  statements go on being counted, slow ones logged;
- rows fetched from a server-side cursor inside the stretch (waiting on the database, not idle);
- a ``COMMIT`` sent as a statement (the transaction ends there, not at checkin);
- an ``executemany`` that fails inside a transaction (its time is its checkout's, and the aborted
  transaction idles from its end).

The dialect hooks count connections being opened and time each statement once, whoever hooked
the dialect last: two connects at once are two, and a copy of an engine that shares its dialect
does not time its statements twice.

One clock stands in for ``perf_counter`` on the checkout, statement, fetch and checkin paths; it
moves only when the test moves it. Intervals are sums of powers of two, so sums compare exactly.
"""

from __future__ import annotations

import copy
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite

import poolwatch
from poolwatch._capture import dialect_hooks, pool_hooks, streamed_rows
from poolwatch._log import internal_errors
from poolwatch._record import events
from poolwatch._record import recorder as recorder_module
from poolwatch._record.events import SlowQuery
from poolwatch._record.recorder import PoolRecorder
from tests.metrics import scrape
from tests.record.test_failed_statement_usage import START, Clock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    for module in (pool_hooks, dialect_hooks, recorder_module, streamed_rows):
        monkeypatch.setattr(module, "perf_counter", clock)
    return clock


@pytest.fixture
def taken() -> Iterator[list[Any]]:
    found: list[Any] = []
    previous = events.set_sinks([found.append])
    yield found
    events.set_sinks(previous)


def _calls_take(engine: sa.Engine, clock: Clock, seconds: dict[str, float]) -> None:
    """Each statement named in ``seconds`` takes that long on the clock inside the driver's call,
    by ``execute`` or ``executemany``, failed or not. Put in place before poolwatch wraps the
    dialect, so poolwatch's wrapper times these; unwatching takes both off the test's own engine."""
    dialect = engine.dialect
    execute, executemany = dialect.do_execute, dialect.do_executemany

    def do_execute(cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        clock.now += seconds[statement]
        execute(cursor, statement, parameters, context)

    def do_executemany(cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        clock.now += seconds[statement]
        executemany(cursor, statement, parameters, context)

    dialect.do_execute = do_execute  # type: ignore[method-assign]
    dialect.do_executemany = do_executemany  # type: ignore[method-assign]


def _usage(recorder: PoolRecorder) -> list[float]:
    """[statements, seconds in them, seconds idle in a transaction, stretch began, seconds in
    statements when it began] of the one checkout out now."""
    (entry,) = list(recorder.open_checkouts.values())
    return list(entry[7])


def _in_transaction(registry: CollectorRegistry, pool: str) -> tuple[float, float]:
    samples = scrape(registry)
    return (
        samples.total("poolwatch_idle_in_transaction_seconds_count", pool=pool),
        samples.total("poolwatch_idle_in_transaction_seconds_sum", pool=pool),
    )


def _held_idle_sum(registry: CollectorRegistry, pool: str) -> float:
    return scrape(registry).total("poolwatch_held_idle_seconds_sum", pool=pool)


class _ThirdPartySqlite(SQLiteDialect_pysqlite):
    """A driver poolwatch has no transaction reader for, as a third-party dialect would be: sqlite3
    underneath, under a driver name of its own."""

    driver = "thirdparty"
    supports_statement_cache = True


sa.dialects.registry.register("sqlite.thirdparty", __name__, "_ThirdPartySqlite")


def _sqlite_engine(url: str, **options: Any) -> sa.Engine:
    engine = sa.create_engine(url, pool_size=1, max_overflow=0, **options)
    with engine.begin() as connection:  # the dialect initialized, the table made, before watching
        connection.exec_driver_sql("CREATE TABLE IF NOT EXISTS t (n INTEGER)")
    return engine


def _a_write_then_a_read(
    engine: sa.Engine, clock: Clock, recorder: PoolRecorder
) -> tuple[list[list[float]], bool]:
    """In one transaction: a read, idle 1 s, a write (sqlite3 begins its transaction here), idle
    2 s, a read, idle 4 s, commit, idle 8 s. The usage after each statement, and whether sqlite3
    itself said a transaction was open after the write."""
    seen = []
    with engine.connect() as connection:  # out at 1000
        connection.exec_driver_sql("SELECT n FROM t")  # 1000 to 1000.5
        seen.append(_usage(recorder))
        clock.now += 1.0
        connection.exec_driver_sql("INSERT INTO t VALUES (1)")  # 1001.5 to 1001.75
        seen.append(_usage(recorder))
        dbapi_connection = connection.connection.dbapi_connection
        assert dbapi_connection is not None
        driver_says_open = getattr(dbapi_connection, "_inner", dbapi_connection).in_transaction
        clock.now += 2.0
        connection.exec_driver_sql("SELECT n FROM t")  # 1003.75 to 1004.25
        seen.append(_usage(recorder))
        clock.now += 4.0
        connection.commit()  # 1008.25
        clock.now += 8.0
    return seen, bool(driver_says_open)


SQLITE_TIMES = {"SELECT n FROM t": 0.5, "INSERT INTO t VALUES (1)": 0.25}


def test_a_driver_without_a_reader_counts_statements_and_no_idle_in_a_transaction(
    tmp_path: Path, clock: Clock, registry: CollectorRegistry
) -> None:
    engine = _sqlite_engine(f"sqlite+thirdparty:///{tmp_path / 'db.sqlite'}")
    _calls_take(engine, clock, SQLITE_TIMES)
    watch = poolwatch.watch(engine, registry=registry, name="unread", leak_threshold_seconds=0)
    (recorder,) = watch.recorders
    try:
        seen, driver_says_open = _a_write_then_a_read(engine, clock, recorder)
        assert driver_says_open  # a transaction was open: poolwatch just has no way to know
        assert seen == [[1, 0.5, 0.0, 0.0, 0.0], [2, 0.75, 0.0, 0.0, 0.0], [3, 1.25, 0.0, 0.0, 0.0]]
        assert _in_transaction(registry, "unread") == (1, 0.0)
        assert _held_idle_sum(registry, "unread") == 15.0  # 16.25 held, 1.25 in statements
        assert scrape(registry).total("poolwatch_query_seconds_count", pool="unread") == 3
    finally:
        watch.close()
        engine.dispose()


def test_sqlite3s_flag_opens_the_stretch_at_the_first_write_and_commit_ends_it(
    tmp_path: Path, clock: Clock, registry: CollectorRegistry
) -> None:
    engine = _sqlite_engine(f"sqlite+pysqlite:///{tmp_path / 'db.sqlite'}")
    _calls_take(engine, clock, SQLITE_TIMES)
    watch = poolwatch.watch(engine, registry=registry, name="flag", leak_threshold_seconds=0)
    (recorder,) = watch.recorders
    try:
        seen, driver_says_open = _a_write_then_a_read(engine, clock, recorder)
        assert driver_says_open
        # The read opened no transaction in sqlite3; the write did, and the stretch runs from its
        # end (1001.75) to the next read (2 s), then from that read's end to the commit (4 s).
        assert seen == [
            [1, 0.5, 0.0, 0.0, 0.0],
            [2, 0.75, 0.0, START + 1.75, 0.75],
            [3, 1.25, 2.0, START + 4.25, 1.25],
        ]
        assert _in_transaction(registry, "flag") == (1, 6.0)
        assert _held_idle_sum(registry, "flag") == 15.0
    finally:
        watch.close()
        engine.dispose()


class _Unusual:
    """A DBAPI connection wrapped by something that passes everything through but the attribute
    poolwatch reads the transaction state from (an instrumentation wrapper, say)."""

    def __init__(self, inner: sqlite3.Connection) -> None:
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name: str) -> Any:
        if name == "in_transaction":
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "_inner"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_inner"), name, value)


def test_a_connection_without_the_readers_attribute_costs_one_internal_error_and_nothing_else(
    tmp_path: Path, clock: Clock, registry: CollectorRegistry, taken: list[Any]
) -> None:
    path = tmp_path / "db.sqlite"
    engine = _sqlite_engine(
        f"sqlite+pysqlite:///{path}", creator=lambda: _Unusual(sqlite3.connect(path, check_same_thread=False))
    )
    _calls_take(engine, clock, SQLITE_TIMES)
    watch = poolwatch.watch(
        engine, registry=registry, name="unusual", leak_threshold_seconds=0, slow_query_seconds=0.25
    )
    (recorder,) = watch.recorders
    errors_before = internal_errors.count
    try:
        seen, _ = _a_write_then_a_read(engine, clock, recorder)
        # The first statement finds the reader's attribute missing and stops reading; every
        # statement is still counted, and none is idle in a transaction poolwatch cannot see.
        assert internal_errors.count == errors_before + 1
        assert seen == [[1, 0.5, 0.0, 0.0, 0.0], [2, 0.75, 0.0, 0.0, 0.0], [3, 1.25, 0.0, 0.0, 0.0]]
        # The slow statements after it are still logged (the INSERT took exactly the threshold).
        slow = [event.seconds for event in taken if isinstance(event, SlowQuery)]
        assert slow == [0.5, 0.5]
        assert internal_errors.count == errors_before + 1
    finally:
        watch.close()
        engine.dispose()


@pytest.fixture
def engine(sync_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0)
    with engine.connect():  # opened and initialized before anything is watched or timed
        pass
    yield engine
    engine.dispose()


def test_rows_fetched_from_a_server_side_cursor_inside_a_transaction_are_not_idle(
    engine: sa.Engine, clock: Clock, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    streamed = "SELECT generate_series(1, 5)"
    _calls_take(engine, clock, {"SELECT 1": 0.5, streamed: 0.25})
    fetch = psycopg.ServerCursor.fetchmany

    def slow_fetchmany(self: psycopg.ServerCursor[Any], size: int = 0) -> Any:
        clock.now += 0.125  # the server runs the query as the rows are fetched
        return fetch(self, size)

    monkeypatch.setattr(psycopg.ServerCursor, "fetchmany", slow_fetchmany)
    watch = poolwatch.watch(engine, registry=registry, name="fetched", leak_threshold_seconds=0)
    (recorder,) = watch.recorders
    try:
        with engine.connect() as connection:  # out at 1000
            connection.exec_driver_sql("SELECT 1")  # to 1000.5; a transaction is open
            clock.now += 1.0
            result = connection.exec_driver_sql(streamed, execution_options={"stream_results": True})
            # The statement ended at 1001.75, and the stretch began there; its rows are fetched
            # from then on (the first one as the result is set up).
            assert _usage(recorder)[2:] == [1.0, START + 1.75, 0.75]
            assert [row[0] for row in result] == [1, 2, 3, 4, 5]
            fetching = clock.now - (START + 1.75)
            assert fetching >= 0.25  # the first row, then the rest: two fetches at least
            clock.now += 2.0
            connection.exec_driver_sql("SELECT 1")
            # Idle since the streamed statement ended: 2 s, not the fetching as well.
            assert _usage(recorder) == [3, 1.25 + fetching, 3.0, clock.now, 1.25 + fetching]
            clock.now += 4.0
            connection.rollback()
        assert _in_transaction(registry, "fetched") == (1, 7.0)
    finally:
        watch.close()


def test_a_commit_sent_as_a_statement_ends_the_stretch_there(
    engine: sa.Engine, clock: Clock, registry: CollectorRegistry
) -> None:
    _calls_take(engine, clock, {"BEGIN": 0.125, "SELECT 1": 0.5, "COMMIT": 0.25})
    watch = poolwatch.watch(engine, registry=registry, name="sent", leak_threshold_seconds=0)
    (recorder,) = watch.recorders
    try:
        with engine.connect() as connection:  # out at 1000
            # The application runs its own transactions on an autocommit connection.
            connection.execution_options(isolation_level="AUTOCOMMIT")
            connection.exec_driver_sql("BEGIN")  # to 1000.125
            clock.now += 1.0
            connection.exec_driver_sql("SELECT 1")  # 1001.125 to 1001.625
            clock.now += 2.0
            connection.exec_driver_sql("COMMIT")  # 1003.625 to 1003.875: no transaction after it
            assert _usage(recorder) == [3, 0.875, 3.0, 0.0, 0.625]
            clock.now += 4.0
        assert _in_transaction(registry, "sent") == (1, 3.0)
        assert _held_idle_sum(registry, "sent") == 7.0
    finally:
        watch.close()


def test_a_failed_executemany_is_its_checkouts_and_its_aborted_transaction_idles(
    engine: sa.Engine, clock: Clock, registry: CollectorRegistry
) -> None:
    many = "INSERT INTO many VALUES (1 / %(d)s)"
    _calls_take(engine, clock, {"CREATE TEMPORARY TABLE many (n int)": 0.5, many: 0.25})
    watch = poolwatch.watch(engine, registry=registry, name="many_failed", leak_threshold_seconds=0)
    (recorder,) = watch.recorders
    try:
        with engine.connect() as connection:  # out at 1000
            connection.exec_driver_sql("CREATE TEMPORARY TABLE many (n int)")  # to 1000.5
            clock.now += 2.0
            with pytest.raises(sa.exc.DataError):
                connection.exec_driver_sql(many, [{"d": 1}, {"d": 0}])  # 1002.5 to 1002.75
            assert _usage(recorder) == [2, 0.75, 2.0, START + 2.75, 0.75]
            clock.now += 4.0
            connection.rollback()
        assert _in_transaction(registry, "many_failed") == (1, 6.0)
        assert scrape(registry).total("poolwatch_query_errors_total", pool="many_failed") == 1
    finally:
        watch.close()


def test_a_statement_exactly_as_slow_as_the_threshold_is_not_slower_than_it(
    engine: sa.Engine, clock: Clock, registry: CollectorRegistry, taken: list[Any]
) -> None:
    _calls_take(engine, clock, {"SELECT 1": 0.5, "SELECT 2": 0.625})
    watch = poolwatch.watch(engine, registry=registry, name="slow", slow_query_seconds=0.5)
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
            connection.exec_driver_sql("SELECT 2")
        slow = [(event.seconds, event.threshold_seconds) for event in taken if isinstance(event, SlowQuery)]
        assert slow == [(0.625, 0.5)]
    finally:
        watch.close()


def test_two_connections_opened_at_once_are_two_opening(sync_url: str, registry: CollectorRegistry) -> None:
    engine = sa.create_engine(sync_url, pool_size=2, max_overflow=0)
    with engine.connect():  # the dialect initialized on a first connection...
        pass
    engine.dispose()  # ...that is gone: each caller below opens its own
    both_inside = threading.Barrier(2, timeout=10)
    seen: list[int] = []
    driver_connect = engine.dialect.connect

    def connect(*cargs: Any, **cparams: Any) -> Any:
        both_inside.wait()  # under poolwatch's wrapper: both callers have been counted
        seen.append(recorder.opening)
        both_inside.wait()
        return driver_connect(*cargs, **cparams)

    engine.dialect.connect = connect  # type: ignore[method-assign]
    watch = poolwatch.watch(engine, registry=registry, name="opening")
    (recorder,) = watch.recorders
    failures: list[BaseException] = []

    def check_out() -> None:
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")
        except BaseException as error:
            failures.append(error)

    try:
        callers = [threading.Thread(target=check_out) for _ in range(2)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(20)
        assert failures == []
        assert seen == [2, 2]
        assert (recorder.opening, recorder.connects) == (0, 2)
    finally:
        watch.close()
        engine.dispose()


def test_a_copy_sharing_the_dialect_times_each_statement_once(
    sync_url: str, registry: CollectorRegistry
) -> None:
    """``copy.copy(engine)`` shares the dialect; the copy, disposed, has a pool of its own and is
    watched apart. The dialect's statements are then timed by the copy's hooks, once each."""
    engine = sa.create_engine(sync_url)
    with engine.connect():  # the dialect's first-connect statements, before anything is watched
        pass
    first = poolwatch.watch(engine, registry=registry, name="original")
    copied = copy.copy(engine)
    copied.dispose()
    second = poolwatch.watch(copied, registry=registry, name="copy")
    try:
        assert copied.dialect is engine.dialect and copied.pool is not engine.pool
        with copied.connect() as connection:
            for _ in range(3):
                connection.exec_driver_sql("SELECT 1")
        samples = scrape(registry)
        assert samples.total("poolwatch_query_seconds_count", pool="copy") == 3
        assert samples.total("poolwatch_query_seconds_count", pool="original") == 0
    finally:
        second.close()
        first.close()
        engine.dispose()
        copied.dispose()


@pytest.mark.parametrize("closed_first", ["copy", "original"])
def test_the_engine_still_watched_keeps_timing_when_the_other_sharing_its_dialect_is_released(
    sync_url: str, registry: CollectorRegistry, closed_first: str
) -> None:
    """Releasing either engine takes the hooks off the dialect they share; the one still watched
    gets them back, and its statements go on being timed."""
    engine = sa.create_engine(sync_url)
    with engine.connect():
        pass
    copied = copy.copy(engine)
    copied.dispose()
    watches = {
        "original": poolwatch.watch(engine, registry=registry, name="original"),
        "copy": poolwatch.watch(copied, registry=registry, name="copy"),
    }
    engines = {"original": engine, "copy": copied}
    kept = "copy" if closed_first == "original" else "original"
    try:
        watches[closed_first].close()
        with engines[kept].connect() as connection:
            for _ in range(2):
                connection.exec_driver_sql("SELECT 1")
        assert scrape(registry).total("poolwatch_query_seconds_count", pool=kept) == 2
    finally:
        for watch in watches.values():
            watch.close()
        engine.dispose()
        copied.dispose()
    # Both released: the dialect is the driver's own again.
    assert "do_execute" not in engine.dialect.__dict__
