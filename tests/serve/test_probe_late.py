"""A probe that finishes after its deadline, a failing ping on the asyncio path, and a full pool
that has just moved, on real pools over real PostgreSQL.

The probe's caller normally settles an overrun probe at its deadline; when none does (the caller's
own deadline came first, or it was cancelled), the probe settles itself when it finishes: with the
verdict as of its deadline, not what it found too late, and with the pool's signs of life
(checkins, connects) as of then (read here from the flight: ``_may_retry`` only reads the signs of
the pool's current probe, and the probe's own finish stops it being that). A fault while working
that verdict out is counted and answers ``down`` (``internal``). "Late" is made exact with a clock of the test's own in place of the
probe's ``monotonic``: the scripted ping (tests/serve/test_probe_pings.py) moves it.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.util import await_only

import poolwatch
from poolwatch._log import InternalErrors, internal_errors
from poolwatch._record.recorder import PoolRecorder
from poolwatch._serve import probe
from poolwatch._serve.probe import ProbeResult, _Flight, _PoolProbeState
from tests.serve import test_probe_pings as pings
from tests.serve.test_probe_pings import _Pool, _Script
from tests.serve.test_probe_pings import make_pool as make_pool  # the same pools, closed after


class ScriptedPingError(Exception):
    """A ping's own failure, as a dead connection's driver raises it."""


class _Clock:
    """The probe's ``monotonic``: still unless the test (or a scripted ping) moves it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    clock = _Clock(1000.0)
    monkeypatch.setattr(probe, "monotonic", clock)
    return clock


@pytest.fixture
def script() -> Iterator[Callable[[Callable[[int], bool | None]], _Script]]:
    """What each ping does (see ``_Script``): the scripted dialects read ``pings._script``."""

    def install(answer: Callable[[int], bool | None]) -> _Script:
        pings._script = _Script(answer)
        return pings._script

    yield install
    pings._script = None


def _in_flight(recorder: PoolRecorder, started: float, deadline: float) -> tuple[_PoolProbeState, _Flight]:
    """The pool's probe state with a probe launched at ``started``, as ``_probe_result`` sets it up,
    for a test that runs the probe's task or thread itself (so no caller settles it)."""
    probes = probe.probe_state(recorder)
    flight = _Flight(started, started + deadline, recorder.checkouts)
    with probes.lock:
        probes.flight = flight
        probes.running.add(flight)
    return probes, flight


async def _run(pool: _Pool, probes: _PoolProbeState, flight: _Flight) -> ProbeResult:
    """Run the probe to its end, on its own path (a task, or a thread), and give its settled result."""
    recorder = pool.recorder
    if pool.driver == "asyncpg":
        await probe._run_async(recorder.source, recorder, probes, flight)
    else:
        await asyncio.to_thread(probe._run_sync, recorder.source, recorder, probes, flight)
    return flight.done.result(timeout=0)


def _fail(n: int) -> bool:
    raise ScriptedPingError(f"scripted: ping {n} failed, the connection is dead")


async def _until(condition: Callable[[], bool], what: str) -> None:
    give_up = asyncio.get_running_loop().time() + 30.0
    while not condition():
        assert asyncio.get_running_loop().time() < give_up, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


# -- a ping that raises, on the asyncio path -----------------------------------------------------


async def test_on_the_asyncio_path_a_pooled_connection_whose_ping_raises_is_dropped_for_the_next(
    make_pool: Callable[[str, int], _Pool], script: Callable[..., _Script]
) -> None:
    """The first idle connection's ping raises (dead after a restart): that connection is
    invalidated and closed, not left to the garbage collector, and the next idle one answers."""
    pool = make_pool("asyncpg", 3)
    await pool.fill(2)
    answers = script(lambda n: _fail(n) if n == 0 else None)
    recorder = pool.recorder
    connects, disconnects, errors = recorder.connects, recorder.disconnects, internal_errors.count
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        health = await pings._check(recorder)
        await pings._ended(recorder)
    assert [str(warning.message) for warning in caught] == []
    assert sum(recorder.gc_reclaimed.values()) == 0
    assert (health.status, health.error) == ("ok", None)
    assert answers.pings == 2
    assert internal_errors.count == errors  # dropped cleanly, no fault of ours on the way
    assert recorder.connects == connects  # no connection opened for the probe
    assert recorder.disconnects == disconnects + 1  # the dead one, closed
    # Both slots back: the dead one's, emptied, reconnects when next used.
    assert (pool.pool.checkedout(), pool.pool.checkedin()) == (0, 2)


async def test_on_the_asyncio_path_a_ping_raising_on_a_connection_opened_for_the_probe_is_down(
    make_pool: Callable[[str, int], _Pool], script: Callable[..., _Script]
) -> None:
    """No idle connection: the probe's own, new connection fails its ping, which is the last try.
    Down at once, naming the ping's error class; the connection is dropped, and no other opened."""
    pool = make_pool("asyncpg", 2)
    answers = script(_fail)
    recorder = pool.recorder
    connects, disconnects, errors = recorder.connects, recorder.disconnects, internal_errors.count
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        health = await pings._check(recorder)
        await pings._ended(recorder)
    assert [str(warning.message) for warning in caught] == []
    assert sum(recorder.gc_reclaimed.values()) == 0
    assert (health.status, health.latency, health.error) == ("down", None, "ScriptedPingError")
    assert answers.pings == 1
    assert internal_errors.count == errors
    assert recorder.connects == connects + 1
    assert recorder.disconnects == disconnects + 1
    assert pool.pool.checkedout() == 0


async def test_on_the_asyncio_path_a_ping_raising_after_the_deadline_ends_the_probe_late(
    make_pool: Callable[[str, int], _Pool], script: Callable[..., _Script], clock: _Clock
) -> None:
    """Three idle connections, but the first ping fails after the deadline: the probe drops that
    connection and tries no other; nobody settled it, so it settles itself as of its deadline."""
    pool = make_pool("asyncpg", 3)
    await pool.fill(3)
    recorder = pool.recorder
    probes, flight = _in_flight(recorder, clock.now, 5.0)

    def late_failure(n: int) -> bool:
        clock.now = flight.deadline_at + 1.0
        return _fail(n)

    answers = script(late_failure)
    connects, disconnects, errors = recorder.connects, recorder.disconnects, internal_errors.count
    result = await _run(pool, probes, flight)
    assert result == ProbeResult("down", None, "timeout", flight.deadline_at)
    assert flight.signs == (recorder.checkins, recorder.connects)
    assert answers.pings == 1
    assert internal_errors.count == errors
    assert recorder.connects == connects
    assert recorder.disconnects == disconnects + 1
    assert (pool.pool.checkedout(), pool.pool.checkedin()) == (0, 3)  # the dropped one's slot too
    assert probes.result is result and probes.flight is None and probes.running == set()


# -- a probe that finishes after its deadline, with nobody to settle it --------------------------


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_probe_finishing_after_its_deadline_settles_itself_with_the_verdict_of_then(
    make_pool: Callable[[str, int], _Pool], script: Callable[..., _Script], clock: _Clock, driver: str
) -> None:
    """The ping answers, but a second after the deadline: the probe's verdict is the timeout as
    of its deadline, never the "ok" it found too late, and it notes the pool's signs of life as it
    finishes. That verdict then answers the pool's health checks for the cache period."""
    pool = make_pool(driver, 2)
    await pool.fill(1)
    recorder = pool.recorder
    probes, flight = _in_flight(recorder, clock.now, 5.0)

    def too_late(n: int) -> None:
        clock.now = flight.deadline_at + 1.0
        return None  # the real ping: the database answers

    answers = script(too_late)
    checkins, disconnects, errors = recorder.checkins, recorder.disconnects, internal_errors.count
    result = await _run(pool, probes, flight)
    assert result == ProbeResult("down", None, "timeout", flight.deadline_at)
    assert recorder.checkins == checkins + 1  # the live connection went back to the pool ...
    assert flight.signs == (recorder.checkins, recorder.connects)  # ... before the signs were read
    assert recorder.disconnects == disconnects
    assert internal_errors.count == errors
    assert probes.result is result and probes.flight is None and probes.running == set()
    # The next health check, within the cache period: the late verdict, judged as late (saturated
    # while the pool has not been still for the stall window), and no second probe.
    health = await probe.check_pool(recorder, clock.now + 5.0, 5.0, 10.0, stall_seconds=10.0)
    assert (health.status, health.latency, health.error) == ("saturated", None, "timeout")
    assert answers.pings == 1
    assert probe.probes_running(recorder) == 0


@pytest.mark.parametrize("alive", [True, False])
async def test_a_probe_finishing_exactly_at_its_deadline_is_on_time(
    make_pool: Callable[[str, int], _Pool], script: Callable[..., _Script], clock: _Clock, alive: bool
) -> None:
    """At the deadline instant the probe's own answer stands, with its latency: ok, or down with
    PingReturnedFalse (on a connection opened for it, its last try). On time, it notes no signs."""
    pool = make_pool("asyncpg", 2)
    recorder = pool.recorder
    probes, flight = _in_flight(recorder, clock.now, 5.0)

    def at_the_deadline(n: int) -> bool | None:
        clock.now = flight.deadline_at
        return None if alive else False

    answers = script(at_the_deadline)
    result = await _run(pool, probes, flight)
    if alive:
        assert result == ProbeResult("ok", 5.0, None, flight.deadline_at)
    else:
        assert result == ProbeResult("down", None, "PingReturnedFalse", flight.deadline_at)
    assert flight.signs is None
    assert answers.pings == 1
    assert probes.result is result and probes.flight is None and probes.running == set()


async def _queued_then_cancelled_late(
    pool: _Pool, clock: _Clock, before_cancel: Callable[[], None]
) -> _Flight:
    """The probe queues in a full pool of one while the application holds its connection (taken
    after the probe began: others are served); at the deadline its task is cancelled, as
    ``_cancel_until_done`` does, and it finishes late. ``before_cancel`` runs once it queues."""
    recorder = pool.recorder
    probes, flight = _in_flight(recorder, clock.now, 5.0)
    held = await pool.engine.connect()
    task = asyncio.create_task(probe._run_async(recorder.source, recorder, probes, flight))
    try:
        await _until(lambda: recorder.pending == 1, "the probe to queue")
        assert flight.in_checkout is True
        clock.now = flight.deadline_at + 1.0
        before_cancel()
        task.cancel()
        await asyncio.wait_for(task, 30)  # the probe's task ends on its own: no error escapes it
    finally:
        await held.close()
    assert probes.flight is None and probes.running == set()
    return flight


async def test_a_probe_still_queued_in_a_full_pool_after_its_deadline_says_saturated(
    make_pool: Callable[[str, int], _Pool], clock: _Clock
) -> None:
    """Queued while the application was served, and the pool still full when it finishes late: a
    busy pool, not a dead database. The signs of life are those when it finished."""
    pool = make_pool("asyncpg", 1)
    recorder = pool.recorder
    errors = internal_errors.count
    signs: list[tuple[int, int]] = []
    flight = await _queued_then_cancelled_late(
        pool, clock, lambda: signs.append((recorder.checkins, recorder.connects))
    )
    assert flight.done.result(timeout=0) == ProbeResult("saturated", None, None, flight.deadline_at)
    assert flight.signs == signs[0]
    assert internal_errors.count == errors
    assert pool.pool.checkedout() == 0


class _Recorded(InternalErrors):
    """The real count, and what each call was given."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, BaseException]] = []

    def record(self, site: str, error: BaseException) -> None:
        self.calls.append((site, error))
        super().record(site, error)


async def test_a_fault_working_out_a_late_verdict_is_counted_and_answers_down_internal(
    make_pool: Callable[[str, int], _Pool], clock: _Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the pool's state for the late verdict fails (poolwatch's own bug): the probe still
    settles, down with error "internal" as of when it finished, and the failure is counted under
    its site, never raised out of the probe's task."""
    pool = make_pool("asyncpg", 1)
    fault = RuntimeError("poolwatch's own bug")
    recorded = _Recorded()

    def broken_read(recorder: PoolRecorder) -> Any:
        raise fault

    def inject() -> None:
        monkeypatch.setattr(probe, "read_state", broken_read)
        monkeypatch.setattr(probe, "internal_errors", recorded)

    flight = await _queued_then_cancelled_late(pool, clock, inject)
    assert flight.done.result(timeout=0) == ProbeResult("down", None, "internal", flight.deadline_at + 1.0)
    assert recorded.calls == [("probe_finish", fault)]
    assert recorded.count == 1
    assert flight.signs is None  # the fault came before the signs were read
    assert pool.pool.checkedout() == 0


# -- a full pool that nobody queues for ----------------------------------------------------------


async def test_a_full_pool_that_moved_since_the_last_check_is_ok_at_once(
    sync_url: str, registry: CollectorRegistry
) -> None:
    """Every connection out, nobody queued. The first check sees nothing move before its
    deadline: saturated (no_progress). Then a connection is returned and taken again; the next
    check has seen that progress within the cache period and answers ok from it, without
    watching the pool (which does not move again) until its deadline."""
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0, pool_timeout=5)
    watch = poolwatch.watch(engine, registry=registry, name="moved")
    (recorder,) = watch.recorders
    try:
        connection = engine.connect()
        try:
            first = await probe.check_pool(recorder, probe.monotonic() + 0.2, 0.2, 10.0)
            assert (first.status, first.error) == ("saturated", "no_progress")
        finally:
            connection.close()
        with engine.connect():
            second = await probe.check_pool(recorder, probe.monotonic() + 0.5, 0.5, 10.0)
            assert (second.status, second.error) == ("ok", None)
            assert (second.state.taken, second.pending) == (1, 0)
    finally:
        watch.close()
        engine.dispose()


# -- a probe cancelled while it pings, and the tries at the deadline instant ---------------------


async def test_a_probe_cancelled_while_pinging_drops_the_connection_and_says_timeout(
    make_pool: Callable[[str, int], _Pool], script: Callable[..., _Script], clock: _Clock
) -> None:
    """The ping hangs; the probe's task is cancelled before the clock reaches its deadline (uvloop's
    millisecond timers may fire a hair early): the verdict is down, ``timeout``, as of the cancel,
    and the connection it was pinging is dropped, never left checked out."""
    pool = make_pool("asyncpg", 2)
    await pool.fill(1)
    recorder = pool.recorder
    probes, flight = _in_flight(recorder, clock.now, 5.0)
    pinging = asyncio.Event()

    def hang(n: int) -> None:
        pinging.set()
        await_only(asyncio.Event().wait())  # never answers

    script(hang)
    disconnects = recorder.disconnects
    task = asyncio.create_task(probe._run_async(recorder.source, recorder, probes, flight))
    await asyncio.wait_for(pinging.wait(), 30)
    clock.now += 1.0  # still before the deadline
    task.cancel()
    await asyncio.wait_for(task, 30)  # the probe's task ends on its own: no error escapes it
    assert flight.done.result(timeout=0) == ProbeResult("down", None, "timeout", clock.now)
    assert pool.pool.checkedout() == 0
    assert recorder.disconnects == disconnects + 1
    assert probes.flight is None and probes.running == set()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_ping_failing_exactly_at_the_deadline_is_the_last_try(
    make_pool: Callable[[str, int], _Pool], script: Callable[..., _Script], clock: _Clock, driver: str
) -> None:
    """Idle connections left to try, but the pooled connection's ping fails at the deadline
    instant: no other is tried, and the verdict, on time, names the ping's error."""
    pool = make_pool(driver, 3)
    await pool.fill(3)
    recorder = pool.recorder
    probes, flight = _in_flight(recorder, clock.now, 5.0)

    def at_the_deadline(n: int) -> bool:
        clock.now = flight.deadline_at
        return _fail(n)

    answers = script(at_the_deadline)
    result = await _run(pool, probes, flight)
    assert result == ProbeResult("down", None, "ScriptedPingError", flight.deadline_at)
    assert answers.pings == 1


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_failed_read_of_the_idle_count_still_gives_the_probe_its_two_tries(
    make_pool: Callable[[str, int], _Pool],
    script: Callable[..., _Script],
    clock: _Clock,
    monkeypatch: pytest.MonkeyPatch,
    driver: str,
) -> None:
    """Reading the pool's state for the number of tries fails (poolwatch's own bug): counted, and
    the probe tries two connections as it would with none idle; the second answers."""
    pool = make_pool(driver, 3)
    await pool.fill(2)
    recorder = pool.recorder
    probes, flight = _in_flight(recorder, clock.now, 5.0)
    fault = RuntimeError("poolwatch's own bug")
    recorded = _Recorded()

    def broken_read(recorder: PoolRecorder) -> Any:
        raise fault

    monkeypatch.setattr(probe, "read_state", broken_read)
    monkeypatch.setattr(probe, "internal_errors", recorded)
    answers = script(lambda n: _fail(n) if n == 0 else None)
    result = await _run(pool, probes, flight)
    assert (result.status, result.error) == ("ok", None)
    assert answers.pings == 2
    assert recorded.calls == [("probe_attempts", fault)]


async def test_a_full_pool_whose_own_probe_is_due_exactly_now_is_judged_as_late(
    make_pool: Callable[[str, int], _Pool], clock: _Clock
) -> None:
    """Every slot taken, the last by our own probe, queued, and its deadline is this very instant:
    the answer is that probe's timeout, as of its deadline."""
    pool = make_pool("asyncpg", 1)
    recorder = pool.recorder
    probes, flight = _in_flight(recorder, clock.now, 5.0)
    clock.now = flight.deadline_at
    result = await probe._full_pool_result(recorder, probes, clock.now, 10.0, 10.0)
    assert result == ProbeResult("down", None, "timeout", flight.deadline_at)
    with probes.lock:
        probes.flight = None
        probes.running.clear()


class _Interrupt(BaseException):
    """Not an Exception: what reaches a thread as KeyboardInterrupt or SystemExit would."""


async def test_a_sync_probe_interrupted_while_pinging_drops_the_connection_and_passes_it_on(
    make_pool: Callable[[str, int], _Pool], script: Callable[..., _Script], clock: _Clock
) -> None:
    """An interrupt inside the ping is not the probe's to swallow: it goes on up the probe's
    thread, the verdict is settled on the way (down), and the connection is dropped, never left
    checked out."""
    pool = make_pool("psycopg", 2)
    await pool.fill(1)
    recorder = pool.recorder
    probes, flight = _in_flight(recorder, clock.now, 5.0)

    def interrupted(n: int) -> bool:
        raise _Interrupt

    script(interrupted)
    disconnects = recorder.disconnects
    with pytest.raises(_Interrupt):
        await asyncio.to_thread(probe._run_sync, recorder.source, recorder, probes, flight)
    assert flight.done.result(timeout=0).status == "down"
    assert pool.pool.checkedout() == 0
    assert recorder.disconnects == disconnects + 1
