"""Events and sinks, with no database: a real QueuePool over fake DBAPI connections.

Each notable fact reaches every sink as a small frozen value; the default log sink writes it under
the same name and fields as before; a failing sink is counted and stops nothing; sinks run outside
the recorder's lock.
"""

from __future__ import annotations

import dataclasses
import gc
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

import poolwatch
from poolwatch._capture.pool_hooks import recorder_of
from poolwatch._log import internal_errors
from poolwatch._record import events
from poolwatch._record.events import (
    EVENT_TYPES,
    Event,
    GcReclaimed,
    LeakDetected,
    LeakReturned,
    PoolTimeout,
    SlowQuery,
    shown_path,
)
from tests.fake_dbapi import engine_for_test

WAIT_SECONDS = 10  # for the sweeper thread's first pass; it runs every 0.25 s


class ListSink:
    """Keeps every event; ``wait_for`` blocks until one of a type arrives (from any thread)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.changed = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    def of(self, kind: type[Any]) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]

    def wait_for(self, kind: type[Any]) -> Any:
        with self.changed:
            self.changed.wait_for(lambda: self.of(kind), WAIT_SECONDS)
        found = self.of(kind)
        assert found, f"no {kind.__name__} within {WAIT_SECONDS} s: {self.events}"
        return found[0]


@pytest.fixture
def sink() -> Iterator[ListSink]:
    sink = ListSink()
    previous = events.set_sinks([sink])
    yield sink
    events.set_sinks(previous)


def test_a_leak_and_its_return_reach_the_sink_as_typed_events(sink: ListSink) -> None:
    with engine_for_test() as (engine, _):
        watch = poolwatch.watch(
            engine, registry=CollectorRegistry(), name="leaky", leak_threshold_seconds=0.05
        )
        connection = engine.pool.connect()
        leak = sink.wait_for(LeakDetected)
        connection.close()
        returned = sink.wait_for(LeakReturned)
        watch.close()
    assert (leak.pool, leak.route, leak.threshold_seconds) == ("leaky", "<none>", 0.05)
    assert leak.seconds_held >= 0.05 and leak.stack is None
    assert leak.function == "test_a_leak_and_its_return_reach_the_sink_as_typed_events"
    assert leak.site.startswith(shown_path(__file__) + ":")
    assert (returned.pool, returned.site, returned.function) == ("leaky", leak.site, leak.function)
    assert returned.seconds_held >= leak.seconds_held
    with pytest.raises(dataclasses.FrozenInstanceError):
        leak.pool = "other"


def test_a_timeout_names_the_pool_and_who_waited(sink: ListSink) -> None:
    with engine_for_test(pool_size=1, timeout=0.01) as (engine, _):
        watch = poolwatch.watch(engine, registry=CollectorRegistry(), name="tight")
        held = engine.pool.connect()
        with pytest.raises(sa.exc.TimeoutError):
            engine.pool.connect()
        held.close()
        watch.close()
    [timeout] = sink.of(PoolTimeout)
    assert dataclasses.replace(timeout, seconds_waited=0) == PoolTimeout(
        pool="tight",
        seconds_waited=0,
        pool_size=1,
        max_overflow=0,
        overflow=0,
        checked_out=1,
        callers_waiting=1,
    )
    assert timeout.seconds_waited >= 0.01


def test_a_connection_the_garbage_collector_returns(sink: ListSink) -> None:
    with engine_for_test() as (engine, _):
        watch = poolwatch.watch(engine, registry=CollectorRegistry(), name="lost")
        engine.pool.connect()  # dropped at once
        gc.collect()
        watch.close()
    [reclaimed] = sink.of(GcReclaimed)
    assert (reclaimed.pool, reclaimed.route) == ("lost", "<none>")
    assert reclaimed.function == "test_a_connection_the_garbage_collector_returns"


def test_a_slow_statement_carries_its_fingerprint_never_its_literals(sink: ListSink) -> None:
    with engine_for_test() as (engine, _):
        watch = poolwatch.watch(engine, registry=CollectorRegistry(), name="slow", slow_query_seconds=1e-9)
        with engine.connect() as connection:
            connection.exec_driver_sql("UPDATE accounts SET owner = 'a secret' WHERE id = 42")
        watch.close()
    [slow] = sink.of(SlowQuery)
    assert (slow.pool, slow.route, slow.operation) == ("slow", "<none>", "UPDATE")
    assert "secret" not in slow.fingerprint and "42" not in slow.fingerprint
    assert slow.fingerprint.startswith("UPDATE accounts SET owner = ?")


def test_the_default_log_sink_keeps_the_event_names_and_fields() -> None:
    assert events.get_sinks() == events.DEFAULT_SINKS
    with engine_for_test(pool_size=1, timeout=0.01) as (engine, _), capture_logs() as logs:
        watch = poolwatch.watch(engine, registry=CollectorRegistry(), name="logged")
        held = engine.pool.connect()
        with pytest.raises(sa.exc.TimeoutError):
            engine.pool.connect()
        held.close()
        watch.close()
    [logged] = [entry for entry in logs if entry["event"] == "poolwatch.pool_timeout"]
    assert logged == {
        "event": "poolwatch.pool_timeout",
        "log_level": "warning",
        "pool": "logged",
        "route": "<none>",
        "seconds_waited": logged["seconds_waited"],
        "pool_size": 1,
        "max_overflow": 0,
        "overflow": 0,
        "checked_out": 1,
        "callers_waiting": 1,
    }
    assert logged["seconds_waited"] == round(logged["seconds_waited"], 3)


def test_a_failing_sink_is_counted_and_the_others_still_get_the_event() -> None:
    good = ListSink()

    def broken(event: Event) -> None:
        raise RuntimeError("a sink that fails")

    previous = events.set_sinks([broken, good])
    before = internal_errors.count
    try:
        with engine_for_test(pool_size=1, timeout=0.01) as (engine, _):
            watch = poolwatch.watch(engine, registry=CollectorRegistry(), name="sinks")
            held = engine.pool.connect()
            with pytest.raises(sa.exc.TimeoutError):  # the application sees its own error only
                engine.pool.connect()
            held.close()
            watch.close()
    finally:
        events.set_sinks(previous)
    assert [type(event) for event in good.events] == [PoolTimeout]
    assert internal_errors.count == before + 1


def test_sinks_run_outside_the_recorders_lock() -> None:
    """A sink may take as long as it likes (a slow log handler): the pool's other callers never
    wait for it. Another thread takes the recorder's lock while the sink runs."""
    taken: list[bool] = []
    recorders: list[Any] = []

    def lock_taker(event: Event) -> None:
        lock = recorders[0].lock

        def take() -> None:
            acquired = lock.acquire(timeout=WAIT_SECONDS)
            taken.append(acquired)
            if acquired:
                lock.release()

        thread = threading.Thread(target=take)
        thread.start()
        thread.join()

    previous = events.set_sinks([lock_taker])
    try:
        with engine_for_test(pool_size=1, timeout=0.01) as (engine, _):
            watch = poolwatch.watch(
                engine, registry=CollectorRegistry(), name="unlocked", leak_threshold_seconds=0.05
            )
            recorders.append(recorder_of(engine.pool))
            held = engine.pool.connect()
            with pytest.raises(sa.exc.TimeoutError):  # PoolTimeout
                engine.pool.connect()
            del held  # GcReclaimed, from inside the checkin
            gc.collect()
            watch.close()
    finally:
        events.set_sinks(previous)
    assert taken == [True, True]


def test_every_event_is_frozen_slotted_and_named_like_before() -> None:
    assert sorted(kind.name for kind in EVENT_TYPES) == [
        "poolwatch.gc_reclaimed",
        "poolwatch.health_changed",
        "poolwatch.held_during_response",
        "poolwatch.held_idle",
        "poolwatch.idle_in_transaction",
        "poolwatch.leak_detected",
        "poolwatch.leak_returned",
        "poolwatch.pool_timeout",
        "poolwatch.pre_ping_failed",
        "poolwatch.slow_query",
        "poolwatch.threadpool_starvation",
    ]
    for kind in EVENT_TYPES:
        assert vars(kind)["__dataclass_params__"].frozen, kind
        assert "__slots__" in kind.__dict__, kind
