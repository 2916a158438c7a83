"""The probe's small decisions, each against the case that would fool it, on a real pool.

tests/test_probe_stalls.py and tests/test_health_verdicts.py play whole stories through a fault
proxy (a hung probe, a black-holed server); they take seconds per case and cannot place a clock
exactly on a boundary. Here each rule is asked directly, with the pool's real recorder and the
instant given:

- when a fresh probe may start beside a hung one (signs of life since it overran, or its age);
- what an overrun probe says (saturated only if it queued in a full pool while others were
  served), given once, and counted when working it out fails;
- progress: when "moved within the window", "still for the window" and "not known" hold.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import create_async_engine

import poolwatch
from poolwatch._log import internal_errors
from poolwatch._record.recorder import PoolRecorder
from poolwatch._serve import probe
from poolwatch._serve.probe import (
    ProbeResult,
    _Flight,
    _may_retry,
    _PoolProbeState,
    _Progress,
    _settle_overrun,
)


@pytest.fixture
def engine(sync_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0, pool_timeout=5)
    yield engine
    engine.dispose()


@pytest.fixture
def recorder(engine: sa.Engine, registry: CollectorRegistry) -> Iterator[PoolRecorder]:
    watch = poolwatch.watch(engine, registry=registry, name="decided")
    (recorder,) = watch.recorders
    yield recorder
    watch.close()


def _hung(probes: _PoolProbeState, started: float, recorder: PoolRecorder, *, running: int = 1) -> _Flight:
    """A probe started at ``started`` that overran; ``running`` probes of the pool run in all."""
    hung = _Flight(started, started + 1.0, recorder.checkouts)
    hung.signs = (recorder.checkins, recorder.connects)
    probes.running = {hung, *(_Flight(started, started + 1.0, 0) for _ in range(running - 1))}
    probes.flight = hung
    return hung


def _use(engine: sa.Engine, times: int) -> None:
    for _ in range(times):
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))


# -- a fresh probe beside a hung one --------------------------------------------------------------


def test_no_retry_without_signs_of_life_before_the_hung_probe_is_30_s_old(
    engine: sa.Engine, recorder: PoolRecorder
) -> None:
    # Earlier traffic: many checkins over one connection, so checkins and connects differ (a
    # comparison of one against the other would see "life" here).
    _use(engine, 5)
    assert (recorder.checkins, recorder.connects) == (5, 1)
    probes = _PoolProbeState()
    hung = _hung(probes, 1000.0, recorder)
    assert _may_retry(recorder, probes, hung, now=1000.0 + 29.999) is False
    # At 30 s exactly, and after, a retry by age alone.
    assert _may_retry(recorder, probes, hung, now=1000.0 + 30.0) is True
    assert _may_retry(recorder, probes, hung, now=1000.0 + 3600.0) is True


def test_a_connection_returned_since_the_overrun_allows_a_retry_at_once(
    engine: sa.Engine, recorder: PoolRecorder
) -> None:
    _use(engine, 1)
    probes = _PoolProbeState()
    hung = _hung(probes, 1000.0, recorder)
    _use(engine, 1)  # the application's request got through: a checkin, no new connection
    assert hung.signs is not None
    assert recorder.checkins == hung.signs[0] + 1 and recorder.connects == hung.signs[1]
    assert _may_retry(recorder, probes, hung, now=1000.0 + 1.0) is True


def test_a_connection_opened_since_the_overrun_allows_a_retry_at_once(
    engine: sa.Engine, recorder: PoolRecorder
) -> None:
    probes = _PoolProbeState()
    hung = _hung(probes, 1000.0, recorder)
    with engine.connect():  # a new connection opened, still held: no checkin yet
        assert hung.signs is not None
        assert recorder.checkins == hung.signs[0] and recorder.connects == hung.signs[1] + 1
        assert _may_retry(recorder, probes, hung, now=1000.0 + 1.0) is True


def test_never_more_than_three_probes_and_age_alone_leaves_the_third_for_life(
    engine: sa.Engine, recorder: PoolRecorder
) -> None:
    probes = _PoolProbeState()
    hung = _hung(probes, 1000.0, recorder, running=2)
    # Two running: age alone may not take the last place ...
    assert _may_retry(recorder, probes, hung, now=1000.0 + 3600.0) is False
    _use(engine, 1)
    # ... signs of life may.
    assert _may_retry(recorder, probes, hung, now=1000.0 + 1.0) is True
    # Three running: nothing more, whatever the signs or the age.
    _hung(probes, 1000.0, recorder, running=3)
    hung3 = probes.flight
    assert hung3 is not None
    hung3.signs = (recorder.checkins - 1, recorder.connects - 1)
    assert _may_retry(recorder, probes, hung3, now=1000.0 + 3600.0) is False


# -- the verdict of a probe that missed its deadline ------------------------------------------


def test_an_overrun_probe_queued_in_a_full_pool_while_others_were_served_says_saturated(
    engine: sa.Engine, recorder: PoolRecorder
) -> None:
    _use(engine, 1)
    probes = _PoolProbeState()
    flight = _Flight(1000.0, 1001.0, recorder.checkouts)
    probes.flight = flight
    probes.running = {flight}
    flight.in_checkout = True
    with engine.connect():  # someone else got a connection meanwhile, and the pool is full
        result = _settle_overrun(recorder, probes, flight)
        assert result == ProbeResult("saturated", None, None, 1001.0)
        assert flight.signs == (recorder.checkins, recorder.connects)
    assert probes.result == result
    # Given once: later callers get the same answer, whatever the pool does now.
    assert _settle_overrun(recorder, probes, flight) is result


@pytest.mark.parametrize("case", ["not queued", "nobody served", "pool not full"])
def test_an_overrun_probe_otherwise_says_it_timed_out_as_of_its_deadline(
    engine: sa.Engine, recorder: PoolRecorder, case: str
) -> None:
    probes = _PoolProbeState()
    flight = _Flight(1000.0, 1001.0, recorder.checkouts)
    probes.flight = flight
    flight.in_checkout = case != "not queued"
    if case == "pool not full":
        _use(engine, 1)  # served, and returned: the pool has a free slot again
        result = _settle_overrun(recorder, probes, flight)
    elif case == "nobody served":
        connection = engine.connect()
        flight.checkouts_at_start = recorder.checkouts  # the holder was served before the probe
        try:
            result = _settle_overrun(recorder, probes, flight)
        finally:
            connection.close()
    else:
        with engine.connect():
            result = _settle_overrun(recorder, probes, flight)
    assert result == ProbeResult("down", None, "timeout", 1001.0)
    assert probes.result == result


def test_a_probe_replaced_by_another_no_longer_speaks_for_the_pool(
    engine: sa.Engine, recorder: PoolRecorder
) -> None:
    probes = _PoolProbeState()
    old = _Flight(1000.0, 1001.0, recorder.checkouts)
    probes.flight = _Flight(1040.0, 1041.0, recorder.checkouts)
    result = _settle_overrun(recorder, probes, old)
    assert result.status == "down" and old.done.result() is result
    assert probes.result is None


def test_a_failure_working_out_the_verdict_is_counted_and_answers_timeout(
    recorder: PoolRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(recorder: PoolRecorder, flight: _Flight) -> ProbeResult:
        raise RuntimeError("poolwatch's own bug")

    monkeypatch.setattr(probe, "_overrun_verdict", broken)
    probes = _PoolProbeState()
    flight = _Flight(1000.0, 1001.0, recorder.checkouts)
    probes.flight = flight
    errors_before = internal_errors.count
    assert _settle_overrun(recorder, probes, flight) == ProbeResult("down", None, "timeout", 1001.0)
    assert internal_errors.count == errors_before + 1


# -- progress ---------------------------------------------------------------------------------


def test_progress_is_unknown_until_a_window_has_passed_then_still_or_moving() -> None:
    # (check_pool observes the counters before any verdict is asked.)
    progress = _Progress()
    progress.observe((1, 0.0, 0.0, 0, 1), 100.0)
    # One reading tells nothing yet: no change seen, and not the same for a window either.
    assert progress.verdict(100.0, 10.0) is None
    progress.observe((1, 0.0, 0.0, 0, 1), 105.0)
    assert progress.verdict(109.999, 10.0) is None
    assert progress.verdict(110.0, 10.0) is False  # the same since 100.0: still for the window
    progress.observe((2, 0.5, 0.0, 0, 1), 120.0)  # moved, somewhere after the read at 105
    assert progress.verdict(115.0, 10.0) is True  # within the window of 105, at its boundary
    assert progress.verdict(115.001, 10.0) is None
    assert progress.verdict(129.999, 10.0) is None
    assert progress.verdict(130.0, 10.0) is False  # the same since 120.0
    progress.observe((2, 0.5, 0.0, 0, 1), 131.0)
    assert progress.verdict(131.0, 10.0) is False


# -- watching a full pool that nobody queues for ------------------------------------------------


async def test_progress_in_the_last_moment_before_the_deadline_is_seen(
    engine: sa.Engine, recorder: PoolRecorder
) -> None:
    """A connection returned 0.2 s before the check's deadline, with under a second left when the
    watch starts: the pool moves, so the check must see it (ok, not saturated)."""
    probes = _PoolProbeState()
    connection = engine.connect()
    loop = asyncio.get_running_loop()
    deadline_at = probe.monotonic() + 0.6
    loop.call_later(0.4, connection.close)
    assert await probe._watch_progress(recorder, probes, deadline_at) is True
    assert probes.progress.signature == probe.progress_signature(recorder)


async def test_a_pool_that_does_not_move_is_watched_until_the_deadline(
    engine: sa.Engine, recorder: PoolRecorder
) -> None:
    probes = _PoolProbeState()
    with engine.connect():
        deadline_at = probe.monotonic() + 0.3
        assert await probe._watch_progress(recorder, probes, deadline_at) is False
        assert probe.monotonic() >= deadline_at
        assert probes.progress.signature == probe.progress_signature(recorder)


# -- a probe that cannot connect ----------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return int(listener.getsockname()[1])  # closed again: connecting is refused


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_a_refused_connection_is_down_at_once_naming_the_error_class(
    sync_url: str, registry: CollectorRegistry, driver: str
) -> None:
    url = sa.make_url(sync_url).set(drivername=f"postgresql+{driver}", host="127.0.0.1", port=_closed_port())
    engine: Any = (
        create_async_engine(url, pool_size=1, max_overflow=0)
        if driver == "asyncpg"
        else sa.create_engine(url, pool_size=1, max_overflow=0)
    )
    watch = poolwatch.watch(engine, registry=registry, name="refused")
    (recorder,) = watch.recorders
    try:
        health = await probe.check_pool(recorder, probe.monotonic() + 5.0, 5.0, 0.0)
    finally:
        watch.close()
        if driver == "asyncpg":
            await engine.dispose()
        else:
            engine.dispose()
    assert (health.status, health.latency) == ("down", None)
    assert health.error == ("ConnectionRefusedError" if driver == "asyncpg" else "OperationalError")
    assert health.pending == 0


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_a_dead_pooled_connection_is_replaced_by_the_second_attempt_not_called_down(
    sync_url: str, registry: CollectorRegistry, driver: str
) -> None:
    """The pool's one idle connection was killed on the server (a restart, an idle timeout,
    pg_terminate_backend): the ping on it fails, the probe drops it and pings a fresh one: ok."""
    url = sa.make_url(sync_url).set(drivername=f"postgresql+{driver}")
    engine: Any = (
        create_async_engine(url, pool_size=1, max_overflow=0)
        if driver == "asyncpg"
        else sa.create_engine(url, pool_size=1, max_overflow=0)
    )
    watch = poolwatch.watch(engine, registry=registry, name="replaced")
    (recorder,) = watch.recorders
    admin = sa.create_engine(sync_url)
    try:
        if driver == "asyncpg":
            async with engine.connect() as connection:
                pid = (await connection.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
        else:
            with engine.connect() as connection:
                pid = connection.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        with admin.connect() as killer:
            assert killer.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()
        connects = recorder.connects
        health = await probe.check_pool(recorder, probe.monotonic() + 10.0, 10.0, 0.0)
        assert (health.status, health.error) == ("ok", None)
        assert recorder.connects == connects + 1  # the fresh one
        pool = engine.pool if driver == "psycopg" else engine.sync_engine.pool
        assert pool.checkedout() == 0  # the dead one was dropped, not kept out
        assert pool.checkedin() == 1
    finally:
        watch.close()
        admin.dispose()
        if driver == "asyncpg":
            await engine.dispose()
        else:
            engine.dispose()


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_after_a_restart_every_dead_idle_connection_is_dropped_and_the_pool_is_ok(
    sync_url: str, registry: CollectorRegistry, driver: str
) -> None:
    """A restarted server (or a failover) leaves every idle connection dead. The server is back: the
    first check must say ok, not down until the probe has used up the dead ones two at a time."""
    url = sa.make_url(sync_url).set(drivername=f"postgresql+{driver}")
    engine: Any = (
        create_async_engine(url, pool_size=5, max_overflow=0)
        if driver == "asyncpg"
        else sa.create_engine(url, pool_size=5, max_overflow=0)
    )
    watch = poolwatch.watch(engine, registry=registry, name="restarted")
    (recorder,) = watch.recorders
    admin = sa.create_engine(sync_url)
    pool = engine.pool if driver == "psycopg" else engine.sync_engine.pool
    try:
        if driver == "asyncpg":
            connections = [await engine.connect() for _ in range(5)]
            pids = [(await c.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one() for c in connections]
            for connection in connections:
                await connection.close()
        else:
            connections = [engine.connect() for _ in range(5)]
            pids = [c.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() for c in connections]
            for connection in connections:
                connection.close()
        assert pool.checkedin() == 5
        with admin.connect() as killer:
            for pid in pids:
                killer.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        health = await probe.check_pool(recorder, probe.monotonic() + 10.0, 10.0, 0.0)
        assert (health.status, health.error) == ("ok", None)
        assert pool.checkedout() == 0
    finally:
        watch.close()
        admin.dispose()
        if driver == "asyncpg":
            await engine.dispose()
        else:
            engine.dispose()


def test_a_probe_queued_in_its_pool_is_not_counted_among_the_callers_waiting(
    engine: sa.Engine, recorder: PoolRecorder
) -> None:
    """The pool filled between the check and the probe's own checkout: the probe waits in the queue
    like a caller, and is marked so (a full pool then says "saturated", not "timeout", and the
    probe is not reported as one of the application's callers queued). Run directly here, on the
    probe's own thread, so the queueing is certain rather than a race."""
    probes = _PoolProbeState()
    flight = _Flight(probe.monotonic(), probe.monotonic() + 30.0, recorder.checkouts)
    probes.flight = flight
    probes.running.add(flight)
    held = engine.connect()  # the pool of one is full
    runner = threading.Thread(target=probe._run_sync, args=(recorder.source, recorder, probes, flight))
    caller = threading.Thread(target=lambda: engine.connect().close())
    runner.start()
    try:
        deadline = probe.monotonic() + 30.0
        while recorder.pending == 0:
            assert probe.monotonic() < deadline, "the probe never queued"
            time.sleep(0.01)
        assert flight.in_checkout is True
        assert probe._probe_in_checkout(probes) is True
        assert probe._others_pending(recorder, probes) == 0  # only the probe waits
        caller.start()  # an application caller queues behind the probe
        while recorder.pending < 2:
            assert probe.monotonic() < deadline, "the caller never queued"
            time.sleep(0.01)
        assert probe._others_pending(recorder, probes) == 1  # the caller, not the probe
    finally:
        held.close()
    runner.join(30.0)
    if caller.ident is not None:
        caller.join(30.0)
    assert not runner.is_alive()
    assert flight.in_checkout is False
    result = flight.done.result(timeout=0)
    assert (result.status, result.error) == ("ok", None)
    assert probes.running == set() and probes.flight is None


# -- a full pool nobody queues for ----------------------------------------------------------------


async def test_a_full_pool_whose_last_slot_is_our_overdue_probe_is_judged_late(
    engine: sa.Engine, recorder: PoolRecorder
) -> None:
    """The connection that fills the pool is the probe's own, hung past its deadline: not "ok"
    because the pool moved a moment ago, but late (timeout, then judged against the stall window)."""
    probes = _PoolProbeState()
    overdue = _Flight(probe.monotonic() - 5.0, probe.monotonic() - 1.0, recorder.checkouts)
    probes.flight = overdue
    with engine.connect():  # stands for the probe's own checkout
        probes.progress.observe(probe.progress_signature(recorder), probe.monotonic())
        result = await probe._full_pool_result(recorder, probes, probe.monotonic() + 0.2, 10.0, 10.0)
    assert result == ProbeResult("down", None, "timeout", overdue.deadline_at)
    # Once it has its verdict, it no longer speaks for the pool.
    overdue.done.set_result(result)
    with engine.connect():
        probes.progress.observe(probe.progress_signature(recorder), probe.monotonic())
        later = await probe._full_pool_result(recorder, probes, probe.monotonic() + 0.2, 10.0, 10.0)
    assert later.status in ("ok", "saturated") and later.error != "timeout"


async def test_a_full_pool_nobody_queues_for_reuses_a_fresh_answer_only(
    engine: sa.Engine, recorder: PoolRecorder
) -> None:
    probes = _PoolProbeState()
    fresh = ProbeResult("ok", 0.001, None, probe.monotonic())
    probes.result = fresh
    with engine.connect():
        assert await probe._full_pool_result(recorder, probes, probe.monotonic() + 0.2, 10.0, 10.0) is fresh
        stale = ProbeResult("ok", 0.001, None, probe.monotonic() - 11.0)
        probes.result = stale
        probes.progress.observe(probe.progress_signature(recorder), probe.monotonic() - 20.0)
        probes.progress.observe(probe.progress_signature(recorder), probe.monotonic() - 10.5)
        answer = await probe._full_pool_result(recorder, probes, probe.monotonic() + 0.2, 10.0, 10.0)
    # Nothing moved for the cache period and nothing moves before the deadline: every connection
    # out and still.
    assert (answer.status, answer.error) == ("saturated", "no_progress")
    assert probes.progress.seen_at >= probe.monotonic() - 1.0
