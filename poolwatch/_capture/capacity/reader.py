"""When, where and on which connection poolwatch asks the server for its connection limit.

``ensure_read(recorder)`` is the one entry point. It returns at once: when a read is due and the
pool has idle connections to spare, it starts one in the background and never waits for it. Its
caller (``/health/db``, after working out its answer) may call it as often as it likes; at most one
read per pool runs at a time.

Why apart from the health probe: a read inside the probe's deadline made the probe late over a slow
link (80 ms round trips: the probe answered 503 and its cancelled checkout threw a warm connection
away), and a read cancelled there was not tried again for an hour. Here the read has its own,
generous timeout (``READ_TIMEOUT_SECONDS``) and nothing waits for it.

Which connection: only an idle one of the pool, checked out through ``pool.connect()`` like any
other checkout (filed under the route ``<probe>``), and only when the pool says it holds at least
two (``QueuePool.checkedin() >= 2``). A checkout with no idle connection would open a new
connection or queue behind the application's callers; taking the last idle one would make the next
caller (a request, or the health probe) do the same. So neither is done: the read waits for a later
call, and a pool that never has two idle connections is not read (the setting can give its limit).
It is never a connection the application holds, and poolwatch opens none for it: NullPool (every
checkout opens one) and the pools that hand one connection to several callers (StaticPool,
SingletonThreadPool, AssertionPool) are never read.

Races: on an asyncio engine the look and the take run in one greenlet with no ``await`` between
them, so no other task of the loop that owns the connections can take the idle connection in
between. A sync pool is shared by threads, and other threads may take the two idle connections
between the look and the take (a window of a few bytecodes, and two takers); only then does the
checkout do what any caller's would: open a connection if the pool may overflow, else queue. That
happens in the reader's own daemon thread, bounded by the pool's timeout, and never delays readiness.

The connection goes back as it was found: the cursor is closed and the transaction the query began
is rolled back (``dialect.do_rollback``) whatever happened. A read that timed out or was cancelled
mid-conversation, or whose rollback failed, cannot give its connection back in a known state, so it
invalidates it instead (from outside SQLAlchemy's greenlet, where asyncpg terminates at once).

When: the first time as soon as the pool has two idle connections, then every ``REFRESH_SECONDS``
(the limits change rarely). A failed, timed-out or cancelled read is retried after
``RETRY_FIRST_SECONDS``, doubling up to ``RETRY_MAX_SECONDS`` (with jitter, so a fleet does not
retry in step after a database restart); a failed refresh keeps the last limit read.

Where: asyncio drivers (asyncpg) may only be used on the event loop that owns their connections,
so the read is a task on that loop: the running loop of the caller (``/health/db`` runs there), or
the loop given. Without one the read waits for a caller that has it. Sync drivers read in a daemon
thread; a sync driver cannot be interrupted, so a read hung on a black-holed network holds its one
checkout and its thread until the driver gives up, and no second read starts meanwhile.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy.pool import QueuePool

from ..._log import internal_errors, logger
from ..._record.context import NO_REQUEST, PROBE_ROUTE, RequestContext, current_request
from .limits import Endpoint, Reading, endpoint_of, interpret, query_for

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect, Engine
    from sqlalchemy.pool import Pool

    from ..._record.recorder import PoolRecorder

monotonic = time.monotonic

READ_TIMEOUT_SECONDS = 10.0
REFRESH_SECONDS = 3600.0
RETRY_FIRST_SECONDS = 5.0
RETRY_MAX_SECONDS = 300.0
# An async read handed to another thread's loop that never started it (that loop stopped first)
# stops blocking new reads after this long.
_NEVER_STARTED_SECONDS = 60.0


class _Unclean(Exception):
    """The rollback after the query failed: the connection's state is unknown."""


class _ReaderState:
    """One pool's reads: whether one runs, when the next is due, and how many failed in a row."""

    __slots__ = ("failures", "launched_at", "lock", "next_at", "pooler_told", "running", "worker")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = False
        self.launched_at = 0.0
        # The read's thread or task once it exists (None while a loop has yet to start the task).
        self.worker: threading.Thread | asyncio.Task[None] | None = None
        self.next_at = -1.0
        self.failures = 0
        self.pooler_told = False


_states: weakref.WeakKeyDictionary[PoolRecorder, _ReaderState] = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()
# The loop holds tasks weakly: they are kept alive here until they finish.
_tasks: set[asyncio.Task[None]] = set()


def ensure_read(recorder: PoolRecorder, loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Start a read of the server's limit for this pool if one is due; return at once, never raise.

    ``loop``: for an asyncio engine, the event loop that owns its connections, when the caller is
    not running on it (the caller's running loop is taken otherwise).
    """
    try:
        _ensure_read(recorder, loop)
    except Exception as error:
        internal_errors.record("server_limit_schedule", error)


def reader_state(recorder: PoolRecorder) -> _ReaderState:
    with _states_lock:
        state = _states.get(recorder)
        if state is None:
            state = _states[recorder] = _ReaderState()
        return state


def _ensure_read(recorder: PoolRecorder, loop: asyncio.AbstractEventLoop | None) -> None:
    if not recorder.server_limit_readable:
        return
    state = reader_state(recorder)
    now = monotonic()
    if now < state.next_at or (state.running and not _abandoned(state, now)):
        return
    engine = recorder.engine
    if engine is None or not _has_idle(engine.pool):
        return
    dialect_name = str(getattr(engine.dialect, "name", ""))
    query = query_for(dialect_name)
    endpoint = endpoint_of(engine.url) if query is not None else None
    if query is None or endpoint is None:
        state.next_at = float("inf")  # SQLite, and servers poolwatch cannot ask: never
        return
    owner: asyncio.AbstractEventLoop | None = None
    if engine.dialect.is_async:
        owner = loop if loop is not None else _running_loop()
        if owner is None or owner.is_closed() or not owner.is_running():
            return
    with state.lock:
        if now < state.next_at or (state.running and not _abandoned(state, now)):
            return
        state.running = True
        state.launched_at = now
        state.worker = None
    job = _Job(engine, recorder, state, dialect_name, query, endpoint)
    try:
        if owner is None:
            thread = threading.Thread(
                target=job.run_sync, name=f"poolwatch-limit-{recorder.name}", daemon=True
            )
            state.worker = thread
            thread.start()
        elif owner is _running_loop():
            job.start_task()
        else:
            owner.call_soon_threadsafe(job.start_task)
    except BaseException:
        with state.lock:
            state.running = False
        raise


def _abandoned(state: _ReaderState, now: float) -> bool:
    """A read handed to a loop that never started it (the loop stopped): it blocks no longer."""
    return state.worker is None and now - state.launched_at > _NEVER_STARTED_SECONDS


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# Idle connections the pool must hold for a read to take one: never its last one.
_IDLE_NEEDED = 2


def _has_idle(pool: Pool | None) -> bool:
    # QueuePool and its subclasses (AsyncAdaptedQueuePool) are the pools that keep idle
    # connections and say how many; every other pool opens one per checkout or shares one.
    return isinstance(pool, QueuePool) and pool.checkedin() >= _IDLE_NEEDED


def _checkout_if_idle(pool: Pool) -> Any | None:
    """The pool's checkout, made only if it leaves an idle connection behind (see the docstring)."""
    if not _has_idle(pool):
        return None
    return pool.connect()


def _reader_context() -> RequestContext:
    """The reader's checkouts are poolwatch's own, filed under ``<probe>`` like the probe's."""
    context = RequestContext({"type": "poolwatch.server_limit"})
    context.resolved_route = PROBE_ROUTE
    context.method = NO_REQUEST
    return context


def _ask(dialect: Dialect, dbapi_connection: Any, query: str) -> tuple[Any, ...] | None:
    """Run ``query`` and leave the connection with no cursor and no transaction open."""
    failure: Exception | None = None
    row: Any = None
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(query)
            row = cursor.fetchone()
        finally:
            cursor.close()
    except Exception as error:
        failure = error
    try:
        # Always, as SQLAlchemy's first_connect does after initialize(): the SELECT began a
        # transaction (or aborted one) that the application must not inherit.
        dialect.do_rollback(dbapi_connection)
    except Exception as error:
        raise _Unclean("rollback after the limit query failed") from error
    if failure is not None:
        raise failure
    return None if row is None else tuple(row)


def _discard(fairy: Any) -> None:
    """Invalidate a connection left in an unknown state, and give its slot back."""
    try:
        fairy.invalidate()
    except Exception as error:
        internal_errors.record("server_limit_invalidate", error)
    try:
        fairy.close()
    except Exception as error:
        internal_errors.record("server_limit_checkin", error)


class _Job:
    """One read: check out an idle connection, ask, give it back, store what was learnt."""

    def __init__(
        self,
        engine: Engine,
        recorder: PoolRecorder,
        state: _ReaderState,
        dialect_name: str,
        query: str,
        endpoint: Endpoint,
    ) -> None:
        self.engine = engine
        self.recorder = recorder
        self.state = state
        self.dialect_name = dialect_name
        self.query = query
        self.endpoint = endpoint

    # -- sync drivers: a daemon thread ------------------------------------------------------------

    def run_sync(self) -> None:
        # A new thread starts with an empty context: the label is set for this thread alone.
        current_request.set(_reader_context())
        outcome: Reading | BaseException | None = None
        try:
            fairy = _checkout_if_idle(self.engine.pool)
            if fairy is not None:
                try:
                    row = _ask(self.engine.dialect, fairy.dbapi_connection, self.query)
                except _Unclean:
                    _discard(fairy)
                    raise
                except BaseException:
                    fairy.close()  # the query failed, the rollback did not: a clean connection
                    raise
                fairy.close()
                outcome = interpret(self.dialect_name, row, self.endpoint)
        except Exception as error:
            outcome = error
        finally:
            _finish(self.recorder, self.state, outcome)

    # -- asyncio drivers: a task on the loop that owns the connections ----------------------------

    def start_task(self) -> None:
        try:
            task = asyncio.get_running_loop().create_task(self.run_async())
        except BaseException as error:
            _finish(self.recorder, self.state, error if isinstance(error, Exception) else None)
            raise
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
        self.state.worker = task

    async def run_async(self) -> None:
        from sqlalchemy.util import greenlet_spawn

        # The task runs in a copy of its creator's context: this label stays with the read.
        current_request.set(_reader_context())
        outcome: Reading | BaseException | None = None
        fairy: Any = None
        try:
            async with asyncio.timeout(READ_TIMEOUT_SECONDS):
                fairy = await greenlet_spawn(_checkout_if_idle, self.engine.pool)
                if fairy is not None:
                    try:
                        row = await greenlet_spawn(
                            _ask, self.engine.dialect, fairy.dbapi_connection, self.query
                        )
                    except _Unclean:
                        raise
                    except Exception:
                        await greenlet_spawn(fairy.close)
                        fairy = None
                        raise
                    await greenlet_spawn(fairy.close)
                    fairy = None
                    outcome = interpret(self.dialect_name, row, self.endpoint)
        except asyncio.CancelledError as cancelled:
            outcome = cancelled
            raise  # cancelled from outside (the loop is shutting down): let it end the task
        except Exception as error:  # TimeoutError when READ_TIMEOUT_SECONDS ran out
            outcome = error
        finally:
            if fairy is not None:
                # Checked out and not given back: cut off mid-conversation, or the rollback failed.
                _discard(fairy)
            _finish(self.recorder, self.state, outcome)


def _finish(recorder: PoolRecorder, state: _ReaderState, outcome: Reading | BaseException | None) -> None:
    """Store a reading, or schedule the retry; ``None`` means no idle connection was there."""
    told: str | None = None
    try:
        now = monotonic()
        with state.lock:
            state.running = False
            state.worker = None
            if isinstance(outcome, Reading):
                state.failures = 0
                state.next_at = now + REFRESH_SECONDS
                recorder.server_connections_max = outcome.limit
                recorder.server_limit_read_at = now
                if outcome.pooler is not None and not state.pooler_told:
                    state.pooler_told = True
                    told = outcome.pooler
            elif outcome is not None:
                state.failures += 1
                state.next_at = now + retry_delay(state.failures)
        if isinstance(outcome, BaseException):
            # A cancellation is counted too: the read it cut short will be tried again.
            internal_errors.record("server_limit", outcome)
        if told is not None:
            logger.info("poolwatch.server_limit_not_claimed", pool=recorder.name, reason=told)
    except Exception as error:
        internal_errors.record("server_limit_finish", error)


def retry_delay(failures: int) -> float:
    """Seconds before the next try after ``failures`` failed reads in a row."""
    delay = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2.0 ** min(failures - 1, 30))
    return delay * random.uniform(0.75, 1.0)
