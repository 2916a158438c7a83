"""The database probe behind ``/health/db``: one checkout from the pool, one ping, single-flight.

Why it is shaped like this:

- Only ``pool.connect()`` is used, so the probe never opens a connection the pool does not own,
  and the dialect's own ``do_ping`` is called through the class (not the instance), so a failed
  probe is not counted as a pre-ping failure by poolwatch's dialect wrapper.
- One probe per pool at a time, process-wide (the state is keyed by the pool's recorder), and its
  result is reused for ``health_cache_seconds``: a herd of probes costs one checkout.
- The probe's checkouts are filed under the route ``PROBE_ROUTE`` (``<probe>``), not ``<none>``,
  so its connection use never reads as the application's work outside requests.
- Async engines are probed by a task on the caller's event loop that is cancelled at the deadline,
  again and again until it is gone: SQLAlchemy closes an invalidated asyncpg connection gracefully
  (shielded, up to 2 s) when it is inside a greenlet, and only a second cancellation cuts that
  short. Our own clean-up runs outside the greenlet, where invalidation terminates at once.
- Sync engines cannot be interrupted, so their probe runs in a daemon thread; a probe that
  overran its deadline answers ``down`` at once and is *hung* while its thread runs on.

A full pool is never probed (the probe would queue behind the application). Its verdict comes
from whether the pool makes progress, which every health check notes as it passes (``_Progress``):
a connection handed out or returned, a statement completed (or failed: the server answered), a
connection opened. The counters only grow, so two checks that read the same values bracket an
interval with no progress at all.

- A full pool with callers queued for a slot (``pending``) is ``saturated`` for as long as it makes
  progress, however slow: a slow but alive database behind a full pool is never ``down``.
- It is ``down`` (error ``stalled``) only once no progress at all was seen for the stall window
  (``health_stall_seconds``), never on the probe's own deadline.
- A full pool with nobody queued is ``ok`` when it made progress within the cache period or makes
  some before the check's deadline, and ``saturated`` (error ``no_progress``) otherwise: every
  connection out and nothing moving. Nobody waits on it, so it is never ``down`` on its own.
- A probe of a pool that is not full and that does not answer by its deadline (a black-holed
  database) is ``saturated`` (error ``timeout``) until the pool has made no progress for the stall
  window, and ``down`` (``stalled``) from then on. A probe that fails outright (refused,
  authentication, a ping that fails on a connection opened for the probe) is ``down`` at once. A
  ping that fails on a pooled connection only condemns that connection: after a database restart
  every idle connection is dead, and the probe drops each and tries the next, as pre-ping would,
  rather than call a database that is back ``down``.

A hung sync probe never holds the pool's status after the database is back: once the cache has
expired, a fresh probe starts beside it when the pool has shown signs of life since the hung one
overran (a connection returned to it or a new one opened: the application's own requests are
getting through), or, with no traffic at all, when the hung one is older than
``_HUNG_RETRY_SECONDS``. At most ``_MAX_RUNNING`` probes per pool are ever running, and retries
by age alone leave the last of those for a retry on signs of life. Drivers with a connect timeout
(psycopg: ``connect_args={"connect_timeout": 5}``) keep probes from hanging in the first place.

Pool classes (SQLAlchemy's own, and their subclasses):

- ``QueuePool``, ``AsyncAdaptedQueuePool`` (and 2.0's ``FallbackAsyncAdaptedQueuePool``) and
  ``NullPool``: probed as above. The probe's connection is its own while checked out, so
  invalidating it after a failed ping touches nothing of the application's; ``NullPool`` opens
  and closes a connection per probe, as it does for every caller.
- ``SingletonThreadPool``: never probed. It keeps one connection per thread and closes arbitrary
  other threads' connections (in use or not) when a new thread pushes it past ``pool_size``; a
  probe always runs on a thread of its own, so it would close the application's connections (and
  on a SQLite ``:memory:`` database it would ping a different, empty database anyway).
- ``StaticPool``: never probed. Its one connection is shared by every caller at once: a probe
  would use it concurrently with the application, its check-in would roll back the application's
  open transaction, and a failed ping would invalidate the connection everyone shares.
- ``AssertionPool``: never probed. It allows one checkout at a time and raises in whichever caller
  asks second, so a probe while the application holds the connection fails, and a probe holding
  it makes the application's own checkout raise.
A pool that is never probed answers ``ok`` from its state alone: nothing about it can be checked
without disturbing the application.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .._log import internal_errors
from .._record.context import NO_REQUEST, RequestContext, current_request
from .._record.context import PROBE_ROUTE as _PROBE_ROUTE
from .._record.source import PoolState
from .collector import read_pool_state

if TYPE_CHECKING:
    from .._record.recorder import PoolRecorder
    from .._record.source import PoolSource

Status = Literal["ok", "down", "saturated"]

# The route label of the probe's own checkouts, beside ``<none>`` and ``<unmatched>``: defined with
# them in ``_record.context`` (the limit read in ``_capture`` uses it too), and named here as well.
PROBE_ROUTE = _PROBE_ROUTE

monotonic = time.monotonic

# After the deadline, how often a probe task is cancelled again until it has finished, and for how
# long at most (a task that survives this is a bug somewhere; it is counted, not waited for).
_RECANCEL_EVERY = 0.05
_RECANCEL_FOR = 5.0
# A ping that fails on a pooled connection may only mean that connection died (a restarted
# server, pg_terminate_backend, an idle timeout); like pre-ping, drop it and try the next, until
# one answers or one opened for the probe fails too. After a restart every idle connection is dead,
# so as many tries as the pool had idle connections, plus one, within the one deadline.
_ATTEMPTS = 2
# How often a check of a full pool that nobody queues for looks for progress until its deadline.
_WATCH_EVERY = 0.01
# Probes of one pool whose thread or task is still running (hung ones included): never more.
_MAX_RUNNING = 3
# With no sign of life, a hung probe gets company after this long, for readiness probes whose
# failure keeps all traffic (and so every sign of life) away from the pod.
_HUNG_RETRY_SECONDS = 30.0

# SQLAlchemy's pools a probe cannot use without disturbing the application (see the module
# docstring), by name: this module imports no SQLAlchemy (each pool's ``PoolSource`` answers).
_NEVER_PROBED = frozenset(
    f"sqlalchemy.pool.impl.{name}" for name in ("SingletonThreadPool", "StaticPool", "AssertionPool")
)


@dataclass(frozen=True)
class ProbeResult:
    status: Status
    latency: float | None
    # An exception class name, "timeout" or "stalled"; never an exception's message, which can
    # name a host, a user or a statement.
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
    # Set when the answer comes from the pool's state alone, saying why no probe ran.
    not_probed: str | None = None


# Why an AsyncEngine is not probed when nothing tells poolwatch which event loop owns its
# connections (sidecar mode with watch() called outside a running loop): an asyncpg connection
# used from another loop or thread breaks the application's own work on it.
NO_OWNING_LOOP = "skipped: no running event loop known to own this AsyncEngine's connections"


def never_probed(pool: object) -> bool:
    """Whether this SQLAlchemy pool's class (or a subclass) cannot be probed without disturbing
    the application."""
    return any(f"{cls.__module__}.{cls.__qualname__}" in _NEVER_PROBED for cls in type(pool).__mro__)


class _Progress:
    """What health checks have seen of the pool's progress counters, and when."""

    __slots__ = ("changed_after", "same_since", "seen_at", "signature")

    def __init__(self) -> None:
        self.signature: tuple[float, ...] | None = None
        # When the counters were last read.
        self.seen_at = -math.inf
        # Nothing moved from this instant to ``seen_at``.
        self.same_since = -math.inf
        # The last progress seen happened after this instant (the read before the one that saw it).
        self.changed_after = -math.inf

    def observe(self, signature: tuple[float, ...], now: float) -> None:
        if signature != self.signature:
            self.changed_after = self.seen_at
            self.same_since = now
            self.signature = signature
        self.seen_at = now

    def verdict(self, now: float, window: float) -> bool | None:
        """True: progress within ``window``; False: none for ``window``; None: not known yet."""
        if now - self.changed_after <= window:
            return True
        if now - self.same_since >= window:
            return False
        return None


def progress_signature(recorder: PoolRecorder) -> tuple[float, ...]:
    """Counters that move with any progress of the pool, and only grow.

    Checkouts; checkins (the seconds held, summed: one float per route, cheaper than the counts);
    statements completed or failed; connections opened.
    """
    statements = sum([histogram.total for histogram in list(recorder.query.values())])
    failed = sum(list(recorder.query_errors.values()))
    return (recorder.checkouts, recorder.checkin_progress, statements, failed, recorder.connects)


class _Flight:
    """One probe under way."""

    def __init__(self, started: float, deadline_at: float, checkouts: int) -> None:
        self.started = started
        # The launching caller's own deadline: it waits exactly this long, then gives the verdict
        # (and notes the signs of life) on the spot.
        self.deadline_at = deadline_at
        self.done: concurrent.futures.Future[ProbeResult] = concurrent.futures.Future()
        # While True the probe is itself one of the pool's callers inside ``connect``.
        self.in_checkout = False
        # The pool's checkout counter when the probe began: more since means others got theirs.
        self.checkouts_at_start = checkouts
        # (checkins, connects) when the probe was found past its deadline: more of either since
        # is a sign of life from the application's own traffic.
        self.signs: tuple[int, int] | None = None


class _PoolProbeState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.result: ProbeResult | None = None
        # The newest probe (it may be past its deadline); older hung ones are only in ``running``.
        self.flight: _Flight | None = None
        # Every probe whose thread or task has not returned; at most _MAX_RUNNING.
        self.running: set[_Flight] = set()
        self.progress = _Progress()
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
    """Whether a probe of this pool is under way (a thread or task of one has not finished)."""
    return probes_running(recorder) > 0


def probes_running(recorder: PoolRecorder) -> int:
    """How many probes of this pool have a thread or task still running (hung ones included)."""
    state = probe_state(recorder)
    with state.lock:
        return len(state.running)


async def check_pool(
    recorder: PoolRecorder,
    deadline_at: float,
    deadline: float,
    cache_seconds: float,
    *,
    stall_seconds: float = 10.0,
    probe: bool = True,
) -> PoolHealth:
    """This pool's health, answered by ``deadline_at`` (a ``time.monotonic()`` instant).

    With ``probe=False`` the answer comes from the pool's state alone (see ``NO_OWNING_LOOP``).
    """
    probes = probe_state(recorder)
    live = recorder.live_checkouts().count
    state = read_pool_state(recorder, live)
    if recorder.source.never_probed():
        return PoolHealth("ok", None, None, state, recorder.pending)
    with probes.lock:
        probes.progress.observe(progress_signature(recorder), monotonic())
    if state.max is not None and state.taken >= state.max:
        # A full pool is judged by whether it makes progress; it is never probed.
        result = await _full_pool_result(recorder, probes, deadline_at, cache_seconds, stall_seconds)
    elif not probe:
        return PoolHealth("ok", None, None, state, recorder.pending, not_probed=NO_OWNING_LOOP)
    else:
        result = await _probe_result(recorder, probes, deadline_at, deadline, cache_seconds)
    result = _judge_late(probes, result, stall_seconds)
    after = read_state(recorder)
    return PoolHealth(result.status, result.latency, result.error, after, _others_pending(recorder, probes))


def _others_pending(recorder: PoolRecorder, probes: _PoolProbeState) -> int:
    """Callers queued for a slot, not counting a probe of ours that may be queued itself."""
    pending = recorder.pending
    return max(0, pending - 1) if pending and _probe_in_checkout(probes) else pending


def _probe_in_checkout(probes: _PoolProbeState) -> bool:
    with probes.lock:
        flight = probes.flight
        return flight is not None and flight.in_checkout


def _stalled(probes: _PoolProbeState, stall_seconds: float) -> bool:
    with probes.lock:
        return probes.progress.verdict(monotonic(), stall_seconds) is False


def _judge_late(probes: _PoolProbeState, result: ProbeResult, stall_seconds: float) -> ProbeResult:
    """A probe that did not answer by its deadline says "slow", not "dead": ``saturated`` until the
    pool has made no progress for the stall window, ``down`` (stalled) from then on."""
    if result.status != "down" or result.error != "timeout":
        return result
    if _stalled(probes, stall_seconds):
        return ProbeResult("down", None, "stalled", result.finished_at)
    return ProbeResult("saturated", None, "timeout", result.finished_at)


def read_state(recorder: PoolRecorder) -> PoolState:
    return read_pool_state(recorder, recorder.live_checkouts().count)


def note_reported(recorder: PoolRecorder, status: Status) -> Status | None:
    """Remember the status last reported for this pool; return the previous one if it changed."""
    probes = probe_state(recorder)
    with probes.lock:
        previous = probes.reported
        probes.reported = status
    return previous if previous != status else None


def _fresh(result: ProbeResult | None, now: float, cache_seconds: float) -> bool:
    # A saturated verdict is not reused: the pool's own state says at once when it has passed.
    return result is not None and result.status != "saturated" and now - result.finished_at < cache_seconds


async def _full_pool_result(
    recorder: PoolRecorder,
    probes: _PoolProbeState,
    deadline_at: float,
    cache_seconds: float,
    stall_seconds: float,
) -> ProbeResult:
    """A pool with every slot taken: probing would mean queueing, so judge its progress instead."""
    now = monotonic()
    queued = _others_pending(recorder, probes)
    with probes.lock:
        if queued:
            if probes.progress.verdict(now, stall_seconds) is False:
                return ProbeResult("down", None, "stalled", now)
            return ProbeResult("saturated", None, None, now)
        flight = probes.flight
        if flight is not None and now >= flight.deadline_at and not flight.done.done():
            # The slot that fills the pool is our own probe's, and it is overdue: judged as late.
            return _timeout(flight)
        cached = probes.result
        if cached is not None and _fresh(cached, now, cache_seconds):
            return cached
        moving = probes.progress.verdict(now, cache_seconds)
    # Nobody queues: "ok" if anything moves within the deadline, else "saturated" (every connection
    # out and nothing moving). Never "down": nobody is waiting on this pool.
    if moving or await _watch_progress(recorder, probes, deadline_at):
        return ProbeResult("ok", None, None, monotonic())
    return ProbeResult("saturated", None, "no_progress", monotonic())


async def _watch_progress(recorder: PoolRecorder, probes: _PoolProbeState, deadline_at: float) -> bool:
    """Whether the pool makes any progress before ``deadline_at``; reading ints is all this costs,
    and a herd of checks each polls, none of them queues."""
    start = progress_signature(recorder)
    while (remaining := deadline_at - monotonic()) > 0:
        await asyncio.sleep(min(_WATCH_EVERY, remaining))
        if progress_signature(recorder) != start:
            break
    signature = progress_signature(recorder)
    with probes.lock:
        probes.progress.observe(signature, monotonic())
    return signature != start


async def _probe_result(
    recorder: PoolRecorder,
    probes: _PoolProbeState,
    deadline_at: float,
    deadline: float,
    cache_seconds: float,
) -> ProbeResult:
    now = monotonic()
    current = probes.flight
    if current is not None and now >= current.deadline_at and not current.done.done():
        # Give the overrun probe its verdict (and note the signs of life) before deciding on it.
        _settle_overrun(recorder, probes, current)
    with probes.lock:
        cached = probes.result
        if cached is not None and _fresh(cached, now, cache_seconds):
            return cached
        flight = probes.flight
        if flight is not None and now >= flight.deadline_at:
            if not _may_retry(recorder, probes, flight, now):
                # The hung probe is still the answer: down, as of its deadline.
                return flight.done.result() if flight.done.done() else _timeout(flight)
            flight = None  # it runs on; a fresh probe takes its place
        if flight is None:
            source = recorder.source
            if source.pool is None:
                return ProbeResult("down", None, "EngineGone", now)
            flight = _Flight(now, min(deadline_at, now + deadline), recorder.checkouts)
            try:
                _launch(source, recorder, probes, flight)
            except Exception as error:
                internal_errors.record("probe_launch", error)
                return ProbeResult("down", None, "internal", now)
            probes.flight = flight
            probes.running.add(flight)
    return await _await_flight(recorder, probes, flight, deadline_at)


async def _await_flight(
    recorder: PoolRecorder, probes: _PoolProbeState, flight: _Flight, deadline_at: float
) -> ProbeResult:
    wait = min(deadline_at, flight.deadline_at) - monotonic()
    if wait > 0 and not flight.done.done():
        waiter = asyncio.wrap_future(flight.done)
        # asyncio.wait, not wait_for: the shared flight must not be cancelled by one impatient caller.
        await asyncio.wait([waiter], timeout=wait)
    if flight.done.done():
        return flight.done.result()
    now = monotonic()
    if deadline_at < flight.deadline_at:  # this caller's own deadline came first
        return ProbeResult("down", None, "timeout", now)
    # Compared as deadlines, not clock readings: the loop may wake a hair before the instant.
    return _settle_overrun(recorder, probes, flight)


def _may_retry(recorder: PoolRecorder, probes: _PoolProbeState, hung: _Flight, now: float) -> bool:
    """Whether a fresh probe may start beside ``hung``, an overrun one still running.

    Caller holds ``probes.lock``.
    """
    running = len(probes.running)
    if running >= _MAX_RUNNING:
        return False
    signs = hung.signs
    if signs is not None and (recorder.checkins > signs[0] or recorder.connects > signs[1]):
        return True
    return running < _MAX_RUNNING - 1 and now - hung.started >= _HUNG_RETRY_SECONDS


def _timeout(flight: _Flight) -> ProbeResult:
    # As of the deadline, so a verdict given late is not cached for longer than one given on time.
    return ProbeResult("down", None, "timeout", flight.deadline_at)


def _overrun_verdict(recorder: PoolRecorder, flight: _Flight) -> ProbeResult:
    """What a probe that missed its deadline says about the pool."""
    if flight.in_checkout and recorder.checkouts > flight.checkouts_at_start:
        # It was queued in the pool while others got connections: if the pool is still full,
        # that is a busy pool, not a dead database.
        state = read_state(recorder)
        if state.max is not None and state.taken >= state.max:
            return ProbeResult("saturated", None, None, flight.deadline_at)
    return _timeout(flight)


def _settle_overrun(recorder: PoolRecorder, probes: _PoolProbeState, flight: _Flight) -> ProbeResult:
    """Give an overrun probe its verdict once; every later caller gets the same."""
    if flight.done.done():
        return flight.done.result()
    try:
        result = _overrun_verdict(recorder, flight)
    except Exception as error:
        internal_errors.record("probe_overrun", error)
        result = _timeout(flight)
    with probes.lock:
        return _settle(probes, flight, result, (recorder.checkins, recorder.connects))


def _settle(
    probes: _PoolProbeState, flight: _Flight, result: ProbeResult, signs: tuple[int, int] | None
) -> ProbeResult:
    """Record a flight's result unless it has one already; caller holds ``probes.lock``."""
    if flight.done.done():
        return flight.done.result()
    flight.done.set_result(result)
    if signs is not None:
        flight.signs = signs
    # A probe that another has replaced no longer speaks for the pool.
    if probes.flight is flight:
        probes.result = result
    return result


def _launch(source: PoolSource, recorder: PoolRecorder, probes: _PoolProbeState, flight: _Flight) -> None:
    """Start the probe; caller holds ``probes.lock``."""
    if source.is_async:
        loop = asyncio.get_running_loop()
        task = loop.create_task(_run_async(source, recorder, probes, flight))
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
        loop.call_later(flight.deadline_at - monotonic(), _cancel_until_done, task, monotonic())
    else:
        thread = threading.Thread(
            target=_run_sync,
            args=(source, recorder, probes, flight),
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


def _probe_context() -> RequestContext:
    """The request context the probe's checkouts run in, so they are filed under ``<probe>``."""
    context = RequestContext({"type": "poolwatch.probe"})
    context.resolved_route = PROBE_ROUTE
    context.method = NO_REQUEST  # not an HTTP request
    return context


async def _run_async(
    source: PoolSource, recorder: PoolRecorder, probes: _PoolProbeState, flight: _Flight
) -> None:
    # The task runs in a copy of its creator's context: this label stays with the probe.
    current_request.set(_probe_context())
    started = monotonic()
    error: str | None = None
    alive = False
    try:
        attempts = _attempts(recorder)
        for attempt in range(attempts):
            flight.in_checkout = True
            opened = recorder.connects
            fairy = await source.checkout_async()
            flight.in_checkout = False
            try:
                alive = await source.ping_async(fairy)
            except Exception:
                source.discard(fairy)
                if _last_try(recorder, opened, attempt, attempts, flight):
                    raise
                continue
            except BaseException:
                source.discard(fairy)
                raise
            if alive:
                await source.release_async(fairy)
                break
            source.discard(fairy)
            if _last_try(recorder, opened, attempt, attempts, flight):
                break
    except asyncio.CancelledError:
        error = "timeout"
    except Exception as failure:
        error = type(failure).__name__
    finally:
        _finish(recorder, probes, flight, started, alive, error)


def _run_sync(source: PoolSource, recorder: PoolRecorder, probes: _PoolProbeState, flight: _Flight) -> None:
    # A new thread starts with an empty context: the label is set for this thread alone.
    current_request.set(_probe_context())
    started = monotonic()
    error: str | None = None
    alive = False
    try:
        attempts = _attempts(recorder)
        for attempt in range(attempts):
            flight.in_checkout = True
            opened = recorder.connects
            fairy: Any = source.checkout_sync()
            flight.in_checkout = False
            try:
                alive = source.ping_sync(fairy)
            except Exception:
                source.discard(fairy)
                if _last_try(recorder, opened, attempt, attempts, flight):
                    raise
                continue
            except BaseException:
                source.discard(fairy)
                raise
            if alive:
                source.release_sync(fairy)
                break
            source.discard(fairy)
            if _last_try(recorder, opened, attempt, attempts, flight):
                break
    except Exception as failure:
        error = type(failure).__name__
    finally:
        _finish(recorder, probes, flight, started, alive, error)


def _attempts(recorder: PoolRecorder) -> int:
    """How many connections one probe may try: one more than the pool holds idle, at least two."""
    try:
        idle = read_state(recorder).idle or 0
    except Exception as error:
        internal_errors.record("probe_attempts", error)
        idle = 0
    return max(_ATTEMPTS, idle + 1)


def _last_try(recorder: PoolRecorder, opened: int, attempt: int, attempts: int, flight: _Flight) -> bool:
    """Whether a failed ping ends the probe: it failed on a connection opened for it (the pool's
    count of connections opened moved during the checkout), the tries are used up, or the deadline
    has passed (the verdict is given without it then)."""
    return recorder.connects != opened or attempt + 1 >= attempts or monotonic() >= flight.deadline_at


def _finish(
    recorder: PoolRecorder,
    probes: _PoolProbeState,
    flight: _Flight,
    started: float,
    alive: bool,
    error: str | None,
) -> None:
    signs: tuple[int, int] | None = None
    try:
        now = monotonic()
        if now > flight.deadline_at:
            # Answered (or due) as of the deadline; whatever it found since comes too late.
            result = _overrun_verdict(recorder, flight)
            signs = (recorder.checkins, recorder.connects)
        elif alive:
            result = ProbeResult("ok", now - started, None, now)
        else:
            result = ProbeResult("down", None, error or "PingReturnedFalse", now)
    except Exception as failure:
        internal_errors.record("probe_finish", failure)
        result = ProbeResult("down", None, "internal", monotonic())
    with probes.lock:
        flight.in_checkout = False
        _settle(probes, flight, result, signs)
        probes.running.discard(flight)
        if probes.flight is flight:
            probes.flight = None
