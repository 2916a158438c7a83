"""A failed statement's place in its checkout's numbers, exactly, and the count of closed connections.

One fake clock stands in for ``perf_counter`` wherever a checkout, a statement or a checkin reads
the time, and it moves only when the test moves it: between statements (idle) and inside the
driver's call (a statement's own time, by a ``do_execute`` of the test's under poolwatch's
wrapper). Every interval is a sum of powers of two, so the numbers compared are exact.

A statement that fails inside a checkout is one of its statements, and its time is time waiting on
the database, not held idle. A failure that leaves the transaction open (aborted, in PostgreSQL)
leaves it open: idle in it counts from the moment the failed statement ended, until the rollback.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from psycopg.errors import DivisionByZero

import poolwatch
from poolwatch._capture import dialect_hooks, pool_hooks
from poolwatch._log import internal_errors
from poolwatch._record import events
from poolwatch._record import recorder as recorder_module
from poolwatch._record.events import HeldIdle, IdleInTransaction, LeakDetected
from poolwatch._record.leaks import sweeper
from poolwatch._record.recorder import PoolRecorder
from tests.fault_fixtures import wait_until
from tests.metrics import scrape

START = 1000.0
# Thresholds below every idle time of the checkouts here: each checkin reports both events.
THRESHOLD = 0.125


@dataclass
class Clock:
    now: float = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    # Every module of the checkout, statement and checkin path that reads the time.
    for module in (pool_hooks, dialect_hooks, recorder_module):
        monkeypatch.setattr(module, "perf_counter", clock)
    return clock


@pytest.fixture
def taken() -> Iterator[list[Any]]:
    found: list[Any] = []
    previous = events.set_sinks([found.append])
    yield found
    events.set_sinks(previous)


@pytest.fixture
def engine(sync_url: str) -> Iterator[sa.Engine]:
    # One connection, opened (and the dialect initialized) before anything is watched or timed:
    # every checkout below reuses it, and nothing but the test's statements moves the clock.
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0)
    with engine.connect():
        pass
    yield engine
    engine.dispose()


def _statements_take(engine: sa.Engine, clock: Clock, seconds: dict[str, float]) -> None:
    """Each statement named in ``seconds`` takes that long on the clock, failed or not (put in place
    before poolwatch wraps the dialect, so poolwatch's wrapper times this one; the engine is the
    test's own, and unwatching takes both off the dialect)."""
    dialect = engine.dialect
    original = dialect.do_execute

    def do_execute(cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        clock.now += seconds[statement]
        original(cursor, statement, parameters, context)

    dialect.do_execute = do_execute  # type: ignore[method-assign]


def _usage(recorder: PoolRecorder) -> list[float]:
    """The usage list of the one checkout out now."""
    (entry,) = list(recorder.open_checkouts.values())
    return list(entry[7])


def _histogram(registry: CollectorRegistry, name: str) -> tuple[float, float]:
    """(count, sum) of ``name`` over all its routes."""
    samples = scrape(registry)
    return samples.total(f"{name}_count"), samples.total(f"{name}_sum")


def test_a_failed_statement_is_a_statement_and_its_aborted_transaction_idles(
    engine: sa.Engine,
    clock: Clock,
    registry: CollectorRegistry,
    taken: list[Any],
) -> None:
    _statements_take(engine, clock, {"SELECT 1": 0.5, "SELECT 1/0": 0.25})
    watch = poolwatch.watch(
        engine,
        registry=registry,
        name="failed",
        leak_threshold_seconds=0,
        held_idle_seconds=THRESHOLD,
        idle_in_transaction_seconds=THRESHOLD,
    )
    (recorder,) = watch.recorders
    try:
        with engine.connect() as connection:  # out at 1000
            clock.now += 1.0  # idle, no transaction yet
            connection.exec_driver_sql("SELECT 1")  # 1001 to 1001.5; autobegin: a transaction
            assert _usage(recorder) == [1, 0.5, 0.0, START + 1.5, 0.5]
            clock.now += 2.0  # idle in the transaction
            with pytest.raises(sa.exc.DataError):
                connection.exec_driver_sql("SELECT 1/0")  # 1003.5 to 1003.75, fails
            # Two statements, 0.75 s inside them; the stretch before the failed one is closed
            # (2 s), and the aborted transaction's begins where the failed statement ended.
            assert _usage(recorder) == [2, 0.75, 2.0, START + 3.75, 0.75]
            clock.now += 4.0  # idle in the aborted transaction
            connection.rollback()  # ends it: 4 s more idle in a transaction
            assert _usage(recorder) == [2, 0.75, 6.0, 0.0, 0.75]
            clock.now += 8.0  # idle, no transaction open
        # Held 15.75 s, 0.75 of it in statements; 6 s idle inside a transaction.
        assert _histogram(registry, "poolwatch_held_idle_seconds") == (1, 15.0)
        assert _histogram(registry, "poolwatch_idle_in_transaction_seconds") == (1, 6.0)
        assert _histogram(registry, "poolwatch_use_seconds") == (1, 15.75)
        samples = scrape(registry)
        assert (
            samples.value(
                "poolwatch_idle_in_transaction_seconds_bucket", pool="failed", route="<none>", le="5.0"
            )
            == 0
        )
        assert (
            samples.value(
                "poolwatch_idle_in_transaction_seconds_bucket", pool="failed", route="<none>", le="10.0"
            )
            == 1
        )
        # The checkout itself took no time on the clock: its wait is in the first bucket.
        wait_first = scrape(registry).value("poolwatch_wait_seconds_bucket", pool="failed", le="0.0001")
        assert wait_first == 1
        assert scrape(registry).total("poolwatch_query_errors_total") == 1
        (held_idle,) = [event for event in taken if isinstance(event, HeldIdle)]
        assert (held_idle.seconds_held, held_idle.seconds_idle, held_idle.statements) == (15.75, 15.0, 2)
        (in_transaction,) = [event for event in taken if isinstance(event, IdleInTransaction)]
        assert (in_transaction.seconds_idle_in_transaction, in_transaction.statements) == (6.0, 2)
    finally:
        watch.close()


def test_a_failed_statement_outside_a_transaction_leaves_nothing_idle_in_one(
    engine: sa.Engine, clock: Clock, registry: CollectorRegistry
) -> None:
    _statements_take(engine, clock, {"SELECT 1/0": 0.5})
    watch = poolwatch.watch(engine, registry=registry, name="autocommit", leak_threshold_seconds=0)
    (recorder,) = watch.recorders
    try:
        with engine.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT")
            clock.now += 1.0
            with pytest.raises(sa.exc.DataError):
                connection.exec_driver_sql("SELECT 1/0")
            # No transaction is open after it: no stretch begins.
            assert _usage(recorder) == [1, 0.5, 0.0, 0.0, 0.0]
            clock.now += 2.0
        assert _histogram(registry, "poolwatch_held_idle_seconds") == (1, 3.0)
        assert _histogram(registry, "poolwatch_idle_in_transaction_seconds") == (1, 0.0)
    finally:
        watch.close()


def test_every_closed_connection_is_counted_once_and_by_its_reason(
    sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=2, max_overflow=1)
    watch = poolwatch.watch(engine, registry=registry, name="closings")
    (recorder,) = watch.recorders
    try:
        with engine.connect(), engine.connect(), engine.connect():
            pass  # the third is overflow: closed at its checkin
        detached = engine.raw_connection()
        detached.detach()  # no longer the pool's: closed as "other"
        detached.close()
        engine.dispose()  # the one connection still kept (the detached one left its record empty)
        reasons = {"overflow": 1, "other": 1, "disposed": 1}
        assert recorder.disconnects == 3
        assert recorder.snapshot().disconnects == 3
        samples = scrape(registry)
        for reason, count in reasons.items():
            assert samples.value("poolwatch_disconnects_total", pool="closings", reason=reason) == count
        assert samples.total("poolwatch_disconnects_total", pool="closings") == 3
        # A reason poolwatch has no label value for (a SQLAlchemy that closes by a new path, say)
        # is counted as "other": the label keeps its documented values.
        recorder.disconnected("closed_by_something_new")
        assert recorder.snapshot().disconnect_reasons == {
            "recycled": 0, "invalidated": 0, "overflow": 1, "reset_failed": 0, "disposed": 1, "other": 2
        }  # fmt: skip
        assert recorder.disconnects == 4
    finally:
        watch.close()
        engine.dispose()


def test_a_failed_statement_with_a_context_of_another_kind_is_still_counted(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    # A dialect's execute called with a context that is not SQLAlchemy's default one (no
    # ``_dbapi_connection``): no checkout to add it to, but the failure counts all the same.
    watch = poolwatch.watch(engine, registry=registry, name="foreign", leak_threshold_seconds=0)
    (recorder,) = watch.recorders
    errors_before = internal_errors.count
    try:
        connection = engine.raw_connection()
        try:
            cursor = connection.cursor()
            with pytest.raises(DivisionByZero):
                engine.dialect.do_execute(cursor, "SELECT 1/0", (), SimpleNamespace())  # type: ignore[arg-type]
            cursor.close()
        finally:
            connection.close()
        assert recorder.query_errors == {("SELECT", "DivisionByZero"): 1}
        assert internal_errors.count == errors_before
    finally:
        watch.close()


# SQLAlchemy warns when the garbage collector reclaims a connection: what this test does on purpose.
@pytest.mark.filterwarnings("ignore:The garbage collector is trying to clean up")
def test_with_every_threshold_off_a_lost_connection_is_still_counted(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    # No threshold to cross (leaks, held idle, idle in transaction all off): a checkin is never
    # "notable" for its hold time, but one the garbage collector made still is.
    watch = poolwatch.watch(
        engine,
        registry=registry,
        name="off",
        leak_threshold_seconds=0,
        held_idle_seconds=0,
        idle_in_transaction_seconds=0,
    )
    errors_before = internal_errors.count
    try:
        with engine.connect():
            pass
        lost = engine.connect()
        del lost
        gc.collect()
        samples = scrape(registry)
        assert samples.total("poolwatch_use_seconds_count", pool="off") == 2
        assert samples.total("poolwatch_gc_reclaimed_total", pool="off") == 1
        assert internal_errors.count == errors_before
    finally:
        watch.close()


def test_a_leak_report_carries_the_borrow_stack_when_asked(
    engine: sa.Engine, clock: Clock, registry: CollectorRegistry, taken: list[Any]
) -> None:
    watch = poolwatch.watch(
        engine, registry=registry, name="stacked", leak_threshold_seconds=1.0, leak_capture_stack=True
    )
    (recorder,) = watch.recorders
    sweeper.discard(recorder)  # swept here, on the test's clock, and nowhere else
    try:
        with engine.connect():
            clock.now += 2.0
            recorder.sweep()
        (leak,) = [event for event in taken if isinstance(event, LeakDetected)]
        assert leak.seconds_held == 2.0
        assert leak.stack is not None
        assert "test_a_leak_report_carries_the_borrow_stack_when_asked" in leak.stack
    finally:
        watch.close()


class _Gone(BaseException):
    """A caller that went away (as asyncio's CancelledError or a killed greenlet is)."""


def test_a_cancelled_caller_is_a_cancelled_wait_and_an_interrupt_is_not(
    postgres_url: str, registry: CollectorRegistry
) -> None:
    raised: list[BaseException] = []

    def creator() -> Any:
        raise raised[-1]

    engine = sa.create_engine("postgresql+psycopg://", creator=creator, pool_size=1)
    watch = poolwatch.watch(engine, registry=registry, name="interrupted")
    try:
        for error in (KeyboardInterrupt(), SystemExit(3), _Gone(), _Gone()):
            raised.append(error)
            with pytest.raises(type(error)):
                engine.connect()
        samples = scrape(registry)
        # Only the two callers that went away; an interrupt or an exit of the process is neither.
        assert samples.total("poolwatch_waits_cancelled_total", pool="interrupted") == 2
        assert samples.value("poolwatch_wait_seconds_count", pool="interrupted") == 4
    finally:
        watch.close()
        engine.dispose()


def test_a_caller_that_queued_then_failed_leaves_no_mark_on_its_thread(
    postgres_url: str, registry: CollectorRegistry
) -> None:
    refuse = threading.Event()

    def creator() -> Any:
        if refuse.is_set():
            raise RuntimeError("refused")
        return psycopg.connect(postgres_url)

    engine = sa.create_engine("postgresql+psycopg://", creator=creator, pool_size=1, max_overflow=0)
    watch = poolwatch.watch(engine, registry=registry, name="marks_after_failure")
    (recorder,) = watch.recorders
    failures: list[BaseException] = []

    def queue_then_fail_then_connect() -> None:
        try:
            engine.connect()  # queues for the one connection, whose reopening is refused
        except BaseException as error:
            failures.append(error)
        refuse.clear()
        with engine.connect():  # the free slot, at once: no queueing on this thread now
            pass

    try:
        held = engine.connect()
        waiter = threading.Thread(target=queue_then_fail_then_connect)
        waiter.start()
        wait_until(lambda: recorder.queued == 1, 10, "the second caller never queued")
        held.invalidate()  # the slot comes back without a connection, and reopening it fails
        refuse.set()
        held.close()
        waiter.join(10)
        assert not waiter.is_alive()
        assert [type(error) for error in failures] == [RuntimeError]
        samples = scrape(registry)
        # The one caller that queued never got a connection: no checkout waited for its slot.
        assert samples.value("poolwatch_checkouts_queued_total", pool="marks_after_failure") == 0
        assert samples.value("poolwatch_checkouts_total", pool="marks_after_failure") == 2
    finally:
        watch.close()
        engine.dispose()


def test_a_caller_that_fails_to_open_while_another_queues_gets_its_own_error(
    postgres_url: str, registry: CollectorRegistry
) -> None:
    opening, refuse = threading.Event(), threading.Event()

    def creator() -> Any:
        opening.set()
        refuse.wait(10)
        raise RuntimeError("refused")

    engine = sa.create_engine(
        "postgresql+psycopg://", creator=creator, pool_size=1, max_overflow=0, pool_timeout=0.25
    )
    watch = poolwatch.watch(engine, registry=registry, name="open_fails")
    (recorder,) = watch.recorders
    errors: dict[str, type[BaseException]] = {}

    def call(name: str) -> None:
        try:
            engine.connect()
        except BaseException as error:
            errors[name] = type(error)

    try:
        opener = threading.Thread(target=call, args=("opener",))
        opener.start()
        assert opening.wait(10)
        queued = threading.Thread(target=call, args=("queued",))
        queued.start()  # the one slot is taken by the opening: this caller queues
        wait_until(lambda: recorder.queued == 1, 10, "the second caller never queued")
        refuse.set()  # the opening fails while the other caller is still queued
        for thread in (opener, queued):
            thread.join(10)
            assert not thread.is_alive()
        # The opener's own error, not poolwatch's; the queued caller times out, or opens after
        # the failure and is refused too, depending on which comes first.
        assert errors["opener"] is RuntimeError
        assert errors["queued"] in (RuntimeError, sa.exc.TimeoutError)
        assert scrape(registry).value("poolwatch_wait_seconds_count", pool="open_fails") == 2
    finally:
        watch.close()
        engine.dispose()


def test_a_caller_that_opens_while_another_queues_is_not_a_queued_checkout(
    postgres_url: str, registry: CollectorRegistry
) -> None:
    opening, release = threading.Event(), threading.Event()

    def creator() -> Any:
        opening.set()
        release.wait(10)
        return psycopg.connect(postgres_url)

    engine = sa.create_engine("postgresql+psycopg://", creator=creator, pool_size=1, max_overflow=0)
    watch = poolwatch.watch(engine, registry=registry, name="open_and_queue")
    (recorder,) = watch.recorders
    errors: list[BaseException] = []

    def use() -> None:
        try:
            with engine.connect():
                pass
        except BaseException as error:
            errors.append(error)

    try:
        opener = threading.Thread(target=use)
        opener.start()
        assert opening.wait(10)
        queued = threading.Thread(target=use)
        queued.start()  # the one slot is being opened: this caller queues for it
        wait_until(lambda: recorder.queued == 1, 10, "the second caller never queued")
        release.set()  # the opener gets its connection without having queued, and returns it
        for thread in (opener, queued):
            thread.join(10)
            assert not thread.is_alive()
        assert errors == []
        samples = scrape(registry)
        assert samples.value("poolwatch_checkouts_total", pool="open_and_queue") == 2
        assert samples.value("poolwatch_checkouts_queued_total", pool="open_and_queue") == 1
    finally:
        watch.close()
        engine.dispose()


def test_checkouts_of_no_time_fall_in_the_first_bucket_of_every_histogram(
    engine: sa.Engine, clock: Clock, registry: CollectorRegistry
) -> None:
    watch = poolwatch.watch(engine, registry=registry, name="instant", leak_threshold_seconds=0)
    try:
        for _ in range(2):
            with engine.connect():
                pass  # the clock never moves: waited, held, idle and idle in a transaction 0 s
        samples = scrape(registry)
        for histogram in (
            "poolwatch_wait_seconds",
            "poolwatch_use_seconds",
            "poolwatch_held_idle_seconds",
            "poolwatch_idle_in_transaction_seconds",
        ):
            first = samples.total(f"{histogram}_bucket", pool="instant", le="0.0001")
            assert (first, samples.total(f"{histogram}_count", pool="instant")) == (2, 2), histogram
    finally:
        watch.close()


def test_idle_between_statements_of_one_transaction_adds_up_exactly(
    engine: sa.Engine, clock: Clock, registry: CollectorRegistry
) -> None:
    """Successful statements close the stretch idle in the transaction before them and open the
    next where they end: 2 s, then 4 s more, and the statements' own time never counts."""
    _statements_take(engine, clock, {"SELECT 1": 0.5, "SELECT 2": 0.25, "SELECT 3": 0.125})
    watch = poolwatch.watch(engine, registry=registry, name="stretches", leak_threshold_seconds=0)
    (recorder,) = watch.recorders
    try:
        with engine.connect() as connection:  # out at 1000
            connection.exec_driver_sql("SELECT 1")  # 1000 to 1000.5; autobegin
            assert _usage(recorder) == [1, 0.5, 0.0, START + 0.5, 0.5]
            clock.now += 2.0
            connection.exec_driver_sql("SELECT 2")  # 1002.5 to 1002.75
            assert _usage(recorder) == [2, 0.75, 2.0, START + 2.75, 0.75]
            clock.now += 4.0
            connection.exec_driver_sql("SELECT 3")  # 1006.75 to 1006.875
            assert _usage(recorder) == [3, 0.875, 6.0, START + 6.875, 0.875]
            connection.rollback()
    finally:
        watch.close()
