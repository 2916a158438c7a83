"""The database probe behind ``/health/db``: one checkout from the pool, one ping, single-flight.

Why it is shaped like this:

- Only ``pool.connect()`` is used, so the probe never opens a connection the pool does not own,
  and the dialect's own ``do_ping`` is called through the class (not the instance), so a failed
  probe is not counted as a pre-ping failure by poolwatch's dialect wrapper.
- One probe per pool at a time, process-wide (the state is keyed by the pool's recorder), and its
  result is reused for ``health_cache_seconds``: a herd of probes costs one checkout.
- Async engines are probed by a task on the caller's event loop that is cancelled at the deadline,
  again and again until it is gone: SQLAlchemy closes an invalidated asyncpg connection gracefully
  (shielded, up to 2 s) when it is inside a greenlet, and only a second cancellation cuts that
  short. Our own clean-up runs outside the greenlet, where invalidation terminates at once.
- Sync engines cannot be interrupted, so their probe runs in a daemon thread; a probe that
  overran its deadline answers ``down`` at once and keeps its slot until the thread returns, so
  there is never a second one queueing behind it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy.util import greenlet_spawn

from ._collector import PoolState, read_pool_state
from ._log import internal_errors

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import Pool

    from ._recorder import PoolRecorder

Status = Literal["ok", "down", "saturated"]

monotonic = time.monotonic

# After the deadline, how often a probe task is cancelled again until it has finished, and for how
# long at most (a task that survives this is a bug somewhere; it is counted, not waited for).
_RECANCEL_EVERY = 0.05
_RECANCEL_FOR = 5.0
# A ping that fails on a pooled connection may only mean that connection died (a restarted
# server, pg_terminate_backend, an idle timeout); like pre-ping, try once more on a fresh one
# before calling the database down. Both attempts share the one deadline.
_ATTEMPTS = 2


@dataclass(frozen=True)
class ProbeResult:
    status: Status
    latency: float | None
    # An exception class name or "timeout"; never an exception's message, which can name a host,
    # a user or a statement.
    error: str | None
    finished_at: float


@dataclass(frozen=True)
class PoolHealth:
    """One pool's answer for one request: the probe result (if any) and the pool's state now."""

    status: Status
    latency: float | None
    error: str | None
    state: PoolState
    pending: int


class _Flight:
    """One probe under way."""

    def __init__(self, started: float, deadline: float) -> None:
        self.started = started
        self.deadline_at = started + deadline
        self.done: concurrent.futures.Future[ProbeResult] = concurrent.futures.Future()
        # While True the probe is itself one of the pool's waiting callers (see check_pool).
        self.in_checkout = False


class _PoolProbeState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.result: ProbeResult | None = None
        self.flight: _Flight | None = None
        # What /health/db last said about this pool; "ok" until told otherwise, so a first
        # failure is logged and a first success is not.
        self.reported: Status = "ok"


_states: weakref.WeakKeyDictionary[PoolRecorder, _PoolProbeState] = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()
# Probe tasks are kept alive here: the event loop itself only holds weak references to tasks.
_tasks: set[asyncio.Task[None]] = set()


def probe_state(recorder: PoolRecorder) -> _PoolProbeState:
    with _states_lock:
        state = _states.get(recorder)
        if state is None:
            state = _states[recorder] = _PoolProbeState()
        return state


def probe_in_flight(recorder: PoolRecorder) -> bool:
    """Whether a probe of this pool is under way (its thread or task has not finished)."""
    state = probe_state(recorder)
    with state.lock:
        return state.flight is not None


async def check_pool(
    recorder: PoolRecorder, deadline_at: float, deadline: float, cache_seconds: float
) -> PoolHealth:
    """This pool's health, answered by ``deadline_at`` (a ``time.monotonic()`` instant)."""
    probes = probe_state(recorder)
    state = read_state(recorder)
    pending = _others_pending(recorder, probes)
    full = state.max is not None and state.used >= state.max
    if full and pending > 0:
        # Probing now would queue behind the callers already waiting: what we see is the answer.
        return PoolHealth("saturated", None, None, state, pending)
    result = await _probe_result(recorder, probes, deadline_at, deadline, cache_seconds, full)
    after = read_state(recorder)
    return PoolHealth(result.status, result.latency, result.error, after, _others_pending(recorder, probes))


def _others_pending(recorder: PoolRecorder, probes: _PoolProbeState) -> int:
    """Callers waiting in the pool, not counting a probe of ours still stuck in its checkout."""
    pending = recorder.pending
    with probes.lock:
        flight = probes.flight
        ours = flight is not None and flight.in_checkout
    return max(0, pending - 1) if ours else pending


def read_state(recorder: PoolRecorder) -> PoolState:
    return read_pool_state(recorder, recorder.live_checkouts().count)


def note_reported(recorder: PoolRecorder, status: Status) -> Status | None:
    """Remember the status last reported for this pool; return the previous one if it changed."""
    probes = probe_state(recorder)
    with probes.lock:
        previous = probes.reported
        probes.reported = status
    return previous if previous != status else None


async def _probe_result(
    recorder: PoolRecorder,
    probes: _PoolProbeState,
    deadline_at: float,
    deadline: float,
    cache_seconds: float,
    full: bool,
) -> ProbeResult:
    now = monotonic()
    with probes.lock:
        cached = probes.result
        # A saturated verdict is not reused: the pool's own state says at once when it has passed.
        if cached is not None and cached.status != "saturated" and now - cached.finished_at < cache_seconds:
            return cached
        flight = probes.flight
        if flight is None and full:
            # Every connection is in use and nobody waits: the pool is working, and a probe would
            # have to queue. The last probe's word stands; with none yet, busy is healthy. (With
            # a probe under way the slot it fills may be its own, so that one is joined instead.)
            return cached or ProbeResult("ok", None, None, now)
        if flight is None:
            engine = recorder.engine
            if engine is None:
                return ProbeResult("down", None, "EngineGone", now)
            flight = probes.flight = _Flight(now, deadline)
            _launch(engine, recorder, probes, flight)
        elif flight.deadline_at <= now:
            # A sync probe that overran its deadline is still in its thread: it is the answer.
            return _timed_out(probes, flight, now)
    wait = min(deadline_at, flight.deadline_at) - monotonic()
    if wait > 0 and not flight.done.done():
        waiter = asyncio.wrap_future(flight.done)
        # asyncio.wait, not wait_for: the shared flight must not be cancelled by one impatient caller.
        await asyncio.wait([waiter], timeout=wait)
    if flight.done.done():
        return flight.done.result()
    with probes.lock:
        return _timed_out(probes, flight, monotonic())


def _timed_out(probes: _PoolProbeState, flight: _Flight, now: float) -> ProbeResult:
    """The result of a flight past its deadline; caller holds ``probes.lock``."""
    if flight.done.done():
        return flight.done.result()
    result = ProbeResult("down", None, "timeout", now)
    if now >= flight.deadline_at:
        flight.done.set_result(result)
        probes.result = result
    return result


def _launch(engine: Engine, recorder: PoolRecorder, probes: _PoolProbeState, flight: _Flight) -> None:
    """Start the probe; caller holds ``probes.lock``."""
    if engine.dialect.is_async:
        loop = asyncio.get_running_loop()
        task = loop.create_task(_run_async(engine, recorder, probes, flight))
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
        loop.call_later(flight.deadline_at - monotonic(), _cancel_until_done, task, monotonic())
    else:
        thread = threading.Thread(
            target=_run_sync,
            args=(engine, recorder, probes, flight),
            name=f"poolwatch-probe-{recorder.name}",
            daemon=True,
        )
        thread.start()


def _cancel_until_done(task: asyncio.Task[None], first: float) -> None:
    if task.done():
        return
    if monotonic() - first > _RECANCEL_FOR:
        internal_errors.record("probe_cancel", RuntimeError("probe task ignores cancellation"))
        return
    task.cancel()
    task.get_loop().call_later(_RECANCEL_EVERY, _cancel_until_done, task, first)


def _checkout(pool: Pool) -> Any:
    # A frame of our own between the greenlet's root and pool.connect: the checkout hook looks
    # two frames up for the borrow site, and a greenlet's stack ends right here.
    return pool.connect()


def _ping(engine: Engine, dbapi_connection: Any) -> bool:
    dialect = engine.dialect
    # Through the class: the instance's do_ping is poolwatch's pre-ping counter.
    return bool(type(dialect).do_ping(dialect, dbapi_connection))


def _discard(fairy: Any) -> None:
    """Throw away a connection the probe may have left mid-conversation, without waiting on it."""
    try:
        fairy.invalidate()
    except Exception as error:
        internal_errors.record("probe_invalidate", error)
    try:
        fairy.close()
    except Exception as error:
        internal_errors.record("probe_checkin", error)


async def _run_async(
    engine: Engine, recorder: PoolRecorder, probes: _PoolProbeState, flight: _Flight
) -> None:
    started = monotonic()
    pool = engine.pool
    error: str | None = None
    alive = False
    waiting_for_checkout = True
    try:
        for attempt in range(_ATTEMPTS):
            flight.in_checkout = True
            fairy = await greenlet_spawn(_checkout, pool)
            flight.in_checkout = waiting_for_checkout = False
            try:
                alive = await greenlet_spawn(_ping, engine, fairy.dbapi_connection)
            except Exception:
                _discard(fairy)
                if attempt + 1 == _ATTEMPTS:
                    raise
                continue
            except BaseException:
                _discard(fairy)
                raise
            if alive:
                await greenlet_spawn(fairy.close)
                break
            _discard(fairy)
    except asyncio.CancelledError:
        error = "timeout"
    except Exception as failure:
        error = type(failure).__name__
    finally:
        _finish(recorder, probes, flight, started, alive, error, waiting_for_checkout)


def _run_sync(engine: Engine, recorder: PoolRecorder, probes: _PoolProbeState, flight: _Flight) -> None:
    started = monotonic()
    error: str | None = None
    alive = False
    waiting_for_checkout = True
    try:
        for attempt in range(_ATTEMPTS):
            flight.in_checkout = True
            fairy: Any = engine.pool.connect()
            flight.in_checkout = waiting_for_checkout = False
            try:
                alive = _ping(engine, fairy.dbapi_connection)
            except Exception:
                _discard(fairy)
                if attempt + 1 == _ATTEMPTS:
                    raise
                continue
            except BaseException:
                _discard(fairy)
                raise
            if alive:
                fairy.close()
                break
            _discard(fairy)
    except Exception as failure:
        error = type(failure).__name__
    finally:
        _finish(recorder, probes, flight, started, alive, error, waiting_for_checkout)


def _finish(
    recorder: PoolRecorder,
    probes: _PoolProbeState,
    flight: _Flight,
    started: float,
    alive: bool,
    error: str | None,
    waiting_for_checkout: bool,
) -> None:
    try:
        now = monotonic()
        status: Status = "ok"
        if now > flight.deadline_at:
            status, error = "down", "timeout"
        elif not alive:
            status, error = "down", error or "PingReturnedFalse"
        if status == "down" and waiting_for_checkout and error == "timeout":
            # The probe lost a race for the last free connection and had to queue: that is a
            # saturated pool, not a dead database.
            # By now our own attempt has left the pool, so what remains is other callers.
            state = read_state(recorder)
            if state.max is not None and state.used >= state.max and recorder.pending > 0:
                status = "saturated"
        result = ProbeResult(status, now - started if status == "ok" else None, error, now)
    except Exception as failure:
        internal_errors.record("probe_finish", failure)
        result = ProbeResult("down", None, "internal", monotonic())
    with probes.lock:
        flight.in_checkout = False
        if not flight.done.done():
            flight.done.set_result(result)
        if probes.flight is flight:
            probes.flight = None
        probes.result = result
