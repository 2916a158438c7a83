"""The starvation signature, condition by condition: callers queued for the pool, every thread
token taken, tasks waiting for a token, and no connection back for the whole window. Each one
missing, alone, means no event; all of them, one event per episode.

The pool is real (a caller really queued behind a held connection); the threadpool's reading is
given, since tests/test_threadpool.py reads AnyIO's limiter and plays a real hang end to end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import poolwatch
from poolwatch._record import events
from poolwatch._record.events import ThreadpoolStarvation
from poolwatch._serve import starvation
from poolwatch._serve.starvation import StarvationCheck
from poolwatch._serve.threadpool import ThreadpoolState

HUNG = ThreadpoolState(busy=4, waiting=2, capacity=4)


@pytest.fixture
def queued(sync_url: str, registry: CollectorRegistry) -> Iterator[tuple[poolwatch.PoolWatch, list[object]]]:
    """A pool of one, its connection held, one caller queued for it; and the events emitted."""
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0, pool_timeout=30)
    watch = poolwatch.watch(engine, registry=registry, name="starving")
    (recorder,) = watch.recorders
    held = engine.connect()
    waiter = threading.Thread(target=lambda: engine.connect().close())
    waiter.start()
    deadline = time.monotonic() + 30
    while recorder.pending == 0:
        assert time.monotonic() < deadline, "the caller never queued"
        time.sleep(0.01)
    seen: list[object] = []
    previous = events.set_sinks([seen.append])
    try:
        yield watch, seen
    finally:
        events.set_sinks(previous)
        held.close()
        waiter.join(30)
        watch.close()
        engine.dispose()


def _check(
    watch: poolwatch.PoolWatch, state: ThreadpoolState | None, monkeypatch: pytest.MonkeyPatch, after: float
) -> StarvationCheck:
    monkeypatch.setattr(starvation, "read_threadpool", lambda loop: state)
    check = StarvationCheck(watch, after_seconds=10.0)
    check.check(now=1000.0)  # notes the checkins seen first
    check.check(now=1000.0 + after)
    return check


def test_every_condition_for_the_whole_window_is_one_event(
    queued: tuple[poolwatch.PoolWatch, list[object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    watch, seen = queued
    check = _check(watch, HUNG, monkeypatch, after=10.0)
    check.check(now=1015.0)  # the same episode: no second event
    (event,) = seen
    assert isinstance(event, ThreadpoolStarvation)
    assert (event.pool, event.threads_busy, event.threads_waiting, event.threads_capacity) == (
        "starving",
        4,
        2,
        4,
    )
    assert (event.callers_waiting, event.checked_out, event.seconds_without_checkin) == (1, 1, 10.0)
    assert event.routes == {"<none>": 1}


@pytest.mark.parametrize(
    ("state", "after"),
    [
        (HUNG, 9.99),  # not yet the whole window
        (ThreadpoolState(busy=3, waiting=2, capacity=4), 10.0),  # a token free
        (ThreadpoolState(busy=4, waiting=0, capacity=4), 10.0),  # nobody waits for a token
        (ThreadpoolState(busy=4, waiting=2, capacity=None), 10.0),  # the app never used a thread
        (None, 10.0),  # no loop known: no threadpool to read
    ],
    ids=["short", "token-free", "none-waiting", "no-threads", "no-loop"],
)
def test_any_condition_missing_is_no_event(
    queued: tuple[poolwatch.PoolWatch, list[object]],
    monkeypatch: pytest.MonkeyPatch,
    state: ThreadpoolState | None,
    after: float,
) -> None:
    watch, seen = queued
    _check(watch, state, monkeypatch, after)
    assert seen == []


def test_nobody_queued_for_the_pool_is_no_event(
    sync_url: str, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0)
    watch = poolwatch.watch(engine, registry=registry, name="not-starving")
    seen: list[object] = []
    previous = events.set_sinks([seen.append])
    try:
        with engine.connect():
            _check(watch, HUNG, monkeypatch, after=60.0)
    finally:
        events.set_sinks(previous)
        watch.close()
        engine.dispose()
    assert seen == []


class _Queue:
    """``size`` connections of a pool held, and ``callers`` threads queued for one, each holding
    what it gets until told to go."""

    def __init__(self, engine: sa.Engine, recorder: object, size: int, callers: int) -> None:
        self.held = [engine.connect() for _ in range(size)]
        self.go = threading.Event()
        self.waiters = [threading.Thread(target=self._wait, args=(engine,)) for _ in range(callers)]
        for waiter in self.waiters:
            waiter.start()
        deadline = time.monotonic() + 30
        while recorder.pending < callers:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "the callers never queued"
            time.sleep(0.01)

    def _wait(self, engine: sa.Engine) -> None:
        with engine.connect():
            self.go.wait(30)

    def close(self) -> None:
        for connection in self.held:
            connection.close()
        self.go.set()
        for waiter in self.waiters:
            waiter.join(30)


def test_a_connection_returned_during_the_window_starts_it_again(
    sync_url: str, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Callers still queue, but a connection came back five seconds in: the pool moves, slowly.
    The window counts from that checkin, so the event comes ten seconds after it, not before."""
    engine = sa.create_engine(sync_url, pool_size=2, max_overflow=0, pool_timeout=30)
    watch = poolwatch.watch(engine, registry=registry, name="slow")
    (recorder,) = watch.recorders
    seen: list[object] = []
    previous = events.set_sinks([seen.append])
    monkeypatch.setattr(starvation, "read_threadpool", lambda loop: HUNG)
    queue = _Queue(engine, recorder, size=2, callers=2)
    try:
        check = StarvationCheck(watch, after_seconds=10.0)
        check.check(now=1000.0)
        queue.held.pop().close()  # the first queued caller takes it and holds it: one still queued
        deadline = time.monotonic() + 30
        while recorder.pending != 1:
            assert time.monotonic() < deadline, "the returned connection was never taken"
            time.sleep(0.01)
        check.check(now=1005.0)  # the checkin is seen here
        check.check(now=1010.0)
        check.check(now=1014.99)
        assert seen == []
        check.check(now=1015.0)
        (event,) = seen
        assert isinstance(event, ThreadpoolStarvation)
        assert (event.callers_waiting, event.checked_out, event.seconds_without_checkin) == (1, 2, 10.0)
    finally:
        events.set_sinks(previous)
        queue.close()
        watch.close()
        engine.dispose()


def test_every_starved_pool_is_reported_in_the_same_check(
    sync_url: str, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two pools, both starved: the check that completes the window reports each of them; the
    first pool's decision does not end the look at the second."""
    engines = [sa.create_engine(sync_url, pool_size=1, max_overflow=0, pool_timeout=30) for _ in range(2)]
    watch = poolwatch.watch({"first": engines[0], "second": engines[1]}, registry=registry)
    seen: list[object] = []
    previous = events.set_sinks([seen.append])
    monkeypatch.setattr(starvation, "read_threadpool", lambda loop: HUNG)
    queues = [
        _Queue(engine, recorder, size=1, callers=1)
        for engine, recorder in zip(engines, watch.recorders, strict=True)
    ]
    try:
        check = StarvationCheck(watch, after_seconds=10.0)
        check.check(now=1000.0)
        check.check(now=1010.0)
        assert sorted(event.pool for event in seen if isinstance(event, ThreadpoolStarvation)) == [
            "first",
            "second",
        ]
        assert len(seen) == 2
    finally:
        events.set_sinks(previous)
        for queue in queues:
            queue.close()
        watch.close()
        for engine in engines:
            engine.dispose()
