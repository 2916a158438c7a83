"""What the probe does with each answer of its ping, on real pools over real PostgreSQL.

SQLAlchemy 2's own dialects raise when a ping fails; SQLAlchemy 1.4's default ``do_ping`` (and
third-party dialects built on it) answer ``False`` for a disconnect instead. The probe must treat
both alike: a failed ping condemns that connection only, the probe drops it and tries the next,
and the pool is ``down`` only once a connection opened for the probe fails too, or the tries or
the deadline run out. A dialect of the test's own (a subclass of the real one, registered with
SQLAlchemy) plays each ping's answer: ``False``, an error, a stall, or the real ping.

Besides: while the probe pings it is no longer one of the pool's queued callers, so a caller
queued behind it is counted as waiting.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.dialects import registry as dialects
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.util import await_only

import poolwatch
from poolwatch._log import internal_errors
from poolwatch._record.context import NO_REQUEST, PROBE_ROUTE
from poolwatch._record.recorder import PoolRecorder
from poolwatch._serve import probe
from poolwatch._serve.probe import _Flight, _PoolProbeState


class _Script:
    """What the n-th ping of a test (from 0) does: ``answer(n)`` returns a bool, raises, or returns
    None for the real ping. Counts the pings."""

    def __init__(self, answer: Callable[[int], bool | None]) -> None:
        self.answer = answer
        self.pings = 0
        self._lock = threading.Lock()

    def __call__(self, real: Callable[[], bool]) -> bool:
        with self._lock:
            n = self.pings
            self.pings += 1
        outcome = self.answer(n)
        return real() if outcome is None else outcome


_script: _Script | None = None


class ScriptedPsycopg(PGDialect_psycopg):
    supports_statement_cache = True  # as its parent: only do_ping differs

    def do_ping(self, dbapi_connection: Any) -> bool:
        if _script is None:
            return bool(super().do_ping(dbapi_connection))
        return _script(lambda: super(ScriptedPsycopg, self).do_ping(dbapi_connection))


class ScriptedAsyncpg(PGDialect_asyncpg):
    supports_statement_cache = True

    def do_ping(self, dbapi_connection: Any) -> bool:
        if _script is None:
            return bool(super().do_ping(dbapi_connection))
        return _script(lambda: super(ScriptedAsyncpg, self).do_ping(dbapi_connection))


dialects.register("postgresql.scripted_psycopg", __name__, "ScriptedPsycopg")
dialects.register("postgresql.scripted_asyncpg", __name__, "ScriptedAsyncpg")


@pytest.fixture
def script() -> Iterator[Callable[[Callable[[int], bool | None]], _Script]]:
    def install(answer: Callable[[int], bool | None]) -> _Script:
        global _script
        _script = _Script(answer)
        return _script

    yield install
    global _script
    _script = None


class _Pool:
    """A scripted engine of either driver, watched, with its pool's counts at hand."""

    def __init__(self, url: str, driver: str, registry: CollectorRegistry, size: int) -> None:
        self.driver = driver
        scripted = sa.make_url(url).set(drivername=f"postgresql+scripted_{driver}")
        engine: Any = (
            create_async_engine(scripted, pool_size=size, max_overflow=0, pool_timeout=10)
            if driver == "asyncpg"
            else sa.create_engine(scripted, pool_size=size, max_overflow=0, pool_timeout=10)
        )
        self.engine = engine
        self.pool: Any = self.engine.pool if driver == "psycopg" else self.engine.sync_engine.pool
        self.watch = poolwatch.watch(self.engine, registry=registry, name=f"scripted_{driver}")
        (self.recorder,) = self.watch.recorders

    async def fill(self, idle: int) -> None:
        """Leave ``idle`` connections in the pool, each used once."""
        if self.driver == "asyncpg":
            connections = [await self.engine.connect() for _ in range(idle)]
            for connection in connections:
                await connection.close()
        else:
            connections = [self.engine.connect() for _ in range(idle)]
            for connection in connections:
                connection.close()
        assert self.pool.checkedin() == idle

    async def close(self) -> None:
        self.watch.close()
        if self.driver == "asyncpg":
            await self.engine.dispose()
        else:
            self.engine.dispose()


@pytest.fixture
async def make_pool(
    sync_url: str, registry: CollectorRegistry
) -> Any:  # an async generator fixture; Any keeps mypy from spelling its type
    made: list[_Pool] = []

    def make(driver: str, size: int) -> _Pool:
        pool = _Pool(sync_url, driver, registry, size)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.close()


async def _check(recorder: PoolRecorder, deadline: float = 10.0) -> probe.PoolHealth:
    return await probe.check_pool(recorder, probe.monotonic() + deadline, deadline, 0.0)


async def _ended(recorder: PoolRecorder) -> None:
    """The probe's thread or task has returned and its frame is gone: a connection it dropped
    without returning would be collected (and warned about) by now."""
    await asyncio.to_thread(_wait_until_no_probe_runs, recorder)
    await asyncio.sleep(0)
    gc.collect()


def _wait_until_no_probe_runs(recorder: PoolRecorder) -> None:
    give_up = time.monotonic() + 30.0
    while probe.probes_running(recorder):
        assert time.monotonic() < give_up, "the probe never finished"
        time.sleep(0.01)


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_a_ping_answering_false_condemns_only_that_connection(
    make_pool: Callable[[str, int], _Pool], script: Callable[..., _Script], driver: str
) -> None:
    """Two of three idle connections answer False (dead after a restart, say): both are dropped,
    the third answers, and the pool is ok without a connection opened for the probe."""
    pool = make_pool(driver, 3)
    await pool.fill(3)
    pings = script(lambda n: False if n < 2 else None)
    connects, disconnects = pool.recorder.connects, pool.recorder.disconnects
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        health = await _check(pool.recorder)
        await _ended(pool.recorder)
    # Dropped or returned, never left to the garbage collector (which warns of an asyncio
    # connection never returned, and poolwatch counts as reclaimed).
    assert [str(warning.message) for warning in caught] == []
    assert sum(pool.recorder.gc_reclaimed.values()) == 0
    assert (health.status, health.error) == ("ok", None)
    assert pings.pings == 3
    # The probe's checkouts are poolwatch's own, filed under <probe>, not under no request.
    assert sum(pool.recorder.use[(PROBE_ROUTE, NO_REQUEST)].counts) == 3
    assert sum(pool.recorder.use[(NO_REQUEST, NO_REQUEST)].counts) == 3  # fill()'s own
    assert pool.recorder.connects == connects
    assert pool.recorder.disconnects == disconnects + 2
    assert pool.pool.checkedout() == 0


@pytest.mark.parametrize("idle", [0, 2])
@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_when_every_ping_answers_false_the_pool_is_down_after_one_fresh_connection(
    make_pool: Callable[[str, int], _Pool], script: Callable[..., _Script], driver: str, idle: int
) -> None:
    """Every idle connection is tried and dropped, then one connection is opened for the probe;
    when that answers False too the database is down. Exactly one is opened, never more."""
    pool = make_pool(driver, 3)
    await pool.fill(idle)
    pings = script(lambda n: False)
    connects, disconnects = pool.recorder.connects, pool.recorder.disconnects
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        health = await _check(pool.recorder)
        await _ended(pool.recorder)
    # Dropped or returned, never left to the garbage collector (which warns of an asyncio
    # connection never returned, and poolwatch counts as reclaimed).
    assert [str(warning.message) for warning in caught] == []
    assert sum(pool.recorder.gc_reclaimed.values()) == 0
    assert (health.status, health.error) == ("down", "PingReturnedFalse")
    assert pings.pings == idle + 1
    again = await _check(pool.recorder)  # reads the first verdict's instant (stale) and probes again
    assert (again.status, again.error) == ("down", "PingReturnedFalse")
    assert pool.recorder.connects == connects + 2  # one fresh connection per check
    assert pool.recorder.disconnects == disconnects + idle + 2
    assert pool.pool.checkedout() == 0


async def test_when_the_tries_run_out_on_pooled_connections_the_verdict_names_the_error(
    make_pool: Callable[[str, int], _Pool], script: Callable[..., _Script]
) -> None:
    """One connection idle (so two tries), and the application returns another while the first
    ping fails: both tries fail on pooled connections. The tries are used up, so the probe ends
    with the ping's own error class, not a generic one, and opens no connection."""
    pool = make_pool("psycopg", 2)
    await pool.fill(2)
    held = pool.engine.connect()  # one idle left

    def answer(n: int) -> bool:
        if n == 0:
            held.close()  # back in the pool while the probe pings: the second try takes it
        raise psycopg.OperationalError("scripted: server closed the connection unexpectedly")

    pings = script(answer)
    connects, disconnects = pool.recorder.connects, pool.recorder.disconnects
    health = await _check(pool.recorder)
    assert (health.status, health.error) == ("down", "OperationalError")
    assert pings.pings == 2
    assert pool.recorder.connects == connects
    assert pool.recorder.disconnects == disconnects + 2
    assert pool.pool.checkedout() == 0


async def test_a_ping_failing_after_the_deadline_ends_the_probe_without_trying_more(
    make_pool: Callable[[str, int], _Pool], script: Callable[..., _Script]
) -> None:
    """The verdict was given at the deadline; a ping failing after it must not go on to drop the
    other idle connections and open new ones for an answer nobody waits for."""
    pool = make_pool("psycopg", 3)
    await pool.fill(3)
    deadline = 1.0
    due = probe.monotonic() + deadline

    def answer(n: int) -> bool:
        while probe.monotonic() <= due + 0.05:
            time.sleep(0.01)
        raise psycopg.OperationalError("scripted: failed after the deadline")

    pings = script(answer)
    connects, disconnects = pool.recorder.connects, pool.recorder.disconnects
    errors = internal_errors.count
    health = await probe.check_pool(pool.recorder, due, deadline, 0.0)
    assert health.status != "ok"
    await asyncio.to_thread(_wait_until_no_probe_runs, pool.recorder)
    assert internal_errors.count == errors  # the late finish worked out its verdict without a fault
    assert pings.pings == 1
    assert pool.recorder.connects == connects
    assert pool.recorder.disconnects == disconnects + 1
    assert pool.pool.checkedout() == 0


def _launched(recorder: PoolRecorder) -> tuple[_PoolProbeState, _Flight]:
    """A probe's state and flight as ``check_pool`` sets them up, for a test that runs the probe
    itself (its thread or task), with a 30 s deadline."""
    probes = _PoolProbeState()
    flight = _Flight(probe.monotonic(), probe.monotonic() + 30.0, recorder.checkouts)
    probes.flight = flight
    probes.running.add(flight)
    return probes, flight


def test_while_the_probe_pings_a_caller_queued_behind_it_is_counted_as_waiting(
    sync_url: str, registry: CollectorRegistry, script: Callable[..., _Script]
) -> None:
    """The probe holds the only connection while its ping is slow; a caller queues for it. The
    probe is out of the queue once it has its connection, so the caller is one waiting, not
    taken for the probe. (tests/serve/test_probe_decisions.py has the probe itself queued.)"""
    engine = sa.create_engine(
        sa.make_url(sync_url).set(drivername="postgresql+scripted_psycopg"),
        pool_size=1,
        max_overflow=0,
        pool_timeout=30,
    )
    watch = poolwatch.watch(engine, registry=registry, name="slow_ping")
    (recorder,) = watch.recorders
    pinging = threading.Event()
    answer = threading.Event()

    def slow(n: int) -> None:
        pinging.set()
        assert answer.wait(30.0)
        return None  # then the real ping

    script(slow)
    probes, flight = _launched(recorder)
    runner = threading.Thread(target=probe._run_sync, args=(recorder.source, recorder, probes, flight))
    caller_done = threading.Event()

    def caller() -> None:
        with engine.connect():
            caller_done.set()

    queued = threading.Thread(target=caller)
    try:
        runner.start()
        assert pinging.wait(30.0)
        assert flight.in_checkout is False
        queued.start()
        give_up = time.monotonic() + 30.0
        while recorder.pending == 0:
            assert time.monotonic() < give_up, "the caller never queued"
            time.sleep(0.01)
        assert probe._probe_in_checkout(probes) is False
        assert probe._others_pending(recorder, probes) == 1
    finally:
        answer.set()
        runner.join(30.0)
        queued.join(30.0)
        watch.close()
        engine.dispose()
    assert not runner.is_alive() and caller_done.is_set()
    result = flight.done.result(timeout=0)
    assert (result.status, result.error) == ("ok", None)


async def test_on_the_asyncio_path_the_probe_counts_as_queued_only_while_it_queues(
    async_url: str, registry: CollectorRegistry, script: Callable[..., _Script]
) -> None:
    """The asyncio probe, queued behind a full pool of one, is not one of the application's
    waiting callers; once it has the connection and pings slowly, a caller queued behind it is."""
    engine = create_async_engine(
        sa.make_url(async_url).set(drivername="postgresql+scripted_asyncpg"),
        pool_size=1,
        max_overflow=0,
        pool_timeout=30,
    )
    watch = poolwatch.watch(engine, registry=registry, name="slow_async_ping")
    (recorder,) = watch.recorders
    pinging = asyncio.Event()
    answer = asyncio.Event()

    def slow(n: int) -> None:
        pinging.set()
        await_only(answer.wait())
        return None  # then the real ping

    script(slow)
    probes, flight = _launched(recorder)

    async def use_once() -> None:
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))

    held = await engine.connect()  # the pool of one is full
    runner = asyncio.create_task(probe._run_async(recorder.source, recorder, probes, flight))
    caller: asyncio.Task[None] | None = None
    try:
        await _until(lambda: recorder.pending == 1, "the probe to queue")
        assert (flight.in_checkout, probe._others_pending(recorder, probes)) == (True, 0)
        await held.close()
        await asyncio.wait_for(pinging.wait(), 30)
        assert flight.in_checkout is False
        caller = asyncio.create_task(use_once())
        await _until(lambda: recorder.pending == 1, "the caller to queue")
        assert probe._others_pending(recorder, probes) == 1
    finally:
        answer.set()
        await asyncio.wait_for(runner, 30)
        if caller is not None:
            await asyncio.wait_for(caller, 30)
        watch.close()
        await engine.dispose()
    result = flight.done.result(timeout=0)
    assert (result.status, result.error) == ("ok", None)


async def _until(condition: Callable[[], bool], what: str) -> None:
    give_up = time.monotonic() + 30.0
    while not condition():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)
