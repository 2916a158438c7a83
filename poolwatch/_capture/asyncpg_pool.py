"""asyncpg's own ``Pool``: poolwatch's hooks on one pool, and the pool as a ``PoolSource``.

asyncpg's ``Pool`` has ``__slots__``, so its instances take no wrappers the way SQLAlchemy's pools
do. A watched pool's ``__class__`` is set to a subclass made for it alone (``__slots__ = ()``, the
same layout, named like the original) that times ``_acquire`` (waits, timeouts, the checkout table
and the borrow site) and ``_get_new_connection`` (connects and connect errors); unwatching sets the
original class back. Unwatched pools are never touched. Beside that, only public seams and the
pool's queue of free connections (a plain ``asyncio.LifoQueue`` instance):

- the queue's ``get`` counts the callers that wait for a free connection (``pending``), and its
  ``put_nowait`` is the checkin: every way a connection goes back (``release``, a connection closed
  or terminated while out) ends there, after the pool's reset, as SQLAlchemy's checkin does;
- each connection gets a query logger (``add_query_logger``: statement timings by operation, errors,
  statements per request, time inside statements per checkout) and a termination listener
  (``add_termination_listener``: disconnects). asyncpg calls both soon after the event, in the
  context of the task that ran the statement.

What asyncpg cannot give: overflow (the pool has none: always 0), connections reclaimed by the
garbage collector (a lost ``PoolConnectionProxy`` is never returned by asyncpg: it shows as a leak),
pre-ping and invalidations (asyncpg has neither).
"""

from __future__ import annotations

import asyncio
import os
import urllib.parse
from bisect import bisect_left
from collections.abc import Callable
from contextvars import copy_context
from typing import TYPE_CHECKING, Any

import asyncpg  # type: ignore[import-untyped]
from asyncpg.pool import Pool, PoolConnectionHolder  # type: ignore[import-untyped]

from .._log import internal_errors
from .._record.context import NO_REQUEST_KEY, current_request, route_label
from .._record.recorder import CheckoutEntry, perf_counter
from .._record.server import role_tag, server_label
from .._record.source import PoolState
from .borrow_site import borrow_site, borrow_stack
from .driver_errors import driver_error_class
from .sql import operation_cache, operation_of
from .tracing import exemplar
from .watched_drivers import UNAVAILABLE, check_version
from .watched_drivers import UnsupportedVersion as UnsupportedVersion
from .watched_drivers import recorders as watched_driver_recorders

if TYPE_CHECKING:
    from .._record.recorder import PoolRecorder

_MARK = "_poolwatch_recorder"
# The versions whose private seams (``Pool._acquire``, ``_get_new_connection``, ``_queue``,
# ``_holders``, ``PoolConnectionProxy._holder``) poolwatch relies on. Tested: 0.32.
SUPPORTED = ((0, 29), (0, 32))
_PROBE_SCOPE = "poolwatch.probe"


def check_supported(version: str | None = None) -> None:
    """Refuse an asyncpg whose pool poolwatch does not know, with a message saying so."""
    missing = [name for name in ("_acquire", "_get_new_connection", "release") if not hasattr(Pool, name)]
    check_version(
        "asyncpg", asyncpg.__version__ if version is None else version, SUPPORTED, missing, "asyncpg"
    )


def is_asyncpg_pool(candidate: object) -> bool:
    return isinstance(candidate, Pool)


class AsyncpgSource:
    """An asyncpg pool as ``_record`` and ``_serve`` see it."""

    library = "asyncpg"
    # Families this library cannot give: exported as absent, never as a made-up zero.
    unavailable = UNAVAILABLE | {"poolwatch_connections_overflow"}  # asyncpg's pool has no overflow
    dialect = "postgresql"
    driver = "asyncpg"
    is_async = True
    engine = None
    pool_class = "asyncpg.Pool"

    def __init__(self, pool: Pool) -> None:
        # asyncpg's Pool takes no weak reference (``__slots__`` without ``__weakref__``): the
        # source holds it until poolwatch lets go of the pool (``PoolWatch.remove``/``close``).
        self._pool: Pool | None = pool
        address = address_of(pool)
        self.server = server_label(address)
        self.role = role_tag(address)

    @property
    def pool(self) -> Pool | None:
        return self._pool

    def forget(self) -> None:
        self._pool = None

    def read_state(self, live_count: int) -> PoolState:
        pool = self._pool
        if pool is None:
            return PoolState(used=live_count, idle=0, overflow=0, max=None, taken=live_count)
        idle = pool.get_idle_size()
        size = pool.get_size()
        # Slots taken: every holder out of the queue (opening a connection included).
        queue = pool._queue
        free = queue.qsize() if queue is not None else pool.get_max_size()
        taken = max(0, pool.get_max_size() - free)
        return PoolState(
            used=live_count,
            idle=max(0, min(idle, size)),
            overflow=0,
            max=pool.get_max_size(),
            taken=max(taken, live_count),
        )

    def never_probed(self) -> bool:
        return False

    async def checkout_async(self) -> Any:
        pool = self._pool
        if pool is None:
            raise ReferenceError("pool released")
        return await pool.acquire()

    async def ping_async(self, connection: Any) -> bool:
        return bool(await connection.fetchval("SELECT 1") == 1)

    async def release_async(self, connection: Any) -> None:
        pool = self._pool
        if pool is not None:
            await pool.release(connection)

    def checkout_sync(self) -> Any:
        raise TypeError("asyncpg pools are probed on their event loop")

    def ping_sync(self, connection: Any) -> bool:
        raise TypeError("asyncpg pools are probed on their event loop")

    def release_sync(self, connection: Any) -> None:
        raise TypeError("asyncpg pools are probed on their event loop")

    def discard(self, connection: Any) -> None:
        try:
            connection.terminate()  # returns the slot to the pool, without waiting on the server
        except Exception as error:
            internal_errors.record("probe_discard", error)


class _Address:
    """host, port, database and user of an asyncpg pool, shaped like the SQLAlchemy URL that
    ``_record.server`` reads (never kept: the user name goes only into the role's keyed hash)."""

    def __init__(self, host: str, port: int, database: str, username: str) -> None:
        self.host, self.port, self.database, self.username = host, port, database, username

    def get_backend_name(self) -> str:
        return "postgresql"


def address_of(pool: Pool) -> _Address:
    """Where the pool connects, from its DSN and keywords as asyncpg reads them, and libpq's
    environment variables for what they leave out."""
    dsn = pool._connect_args[0] if pool._connect_args else None
    keywords = pool._connect_kwargs or {}
    host = port = database = user = None
    if isinstance(dsn, str) and dsn:
        parts = urllib.parse.urlsplit(dsn)
        host = urllib.parse.unquote(parts.hostname) if parts.hostname else None
        try:
            port = parts.port
        except ValueError:
            port = None
        database = urllib.parse.unquote(parts.path.lstrip("/")) or None
        user = urllib.parse.unquote(parts.username) if parts.username else None
        query = urllib.parse.parse_qs(parts.query)
        host = host or next(iter(query.get("host", [])), None)
        database = database or next(iter(query.get("dbname", query.get("database", []))), None)
    given_host = keywords.get("host")
    if isinstance(given_host, (list, tuple)):
        given_host = given_host[0] if given_host else None
    given_port = keywords.get("port")
    if isinstance(given_port, (list, tuple)):
        given_port = given_port[0] if given_port else None
    host = str(given_host or host or os.environ.get("PGHOST") or "localhost")
    port = int(given_port or port or os.environ.get("PGPORT") or 5432)
    user = str(keywords.get("user") or user or os.environ.get("PGUSER") or "")
    database = str(keywords.get("database") or database or os.environ.get("PGDATABASE") or user)
    return _Address(host, port, database, user)


def source_for(pool: Pool) -> AsyncpgSource:
    return AsyncpgSource(pool)


def default_name(pool: Pool) -> str:
    """host:port/database, never a user name or a password."""
    return server_label(address_of(pool))


# -- the hooks ----------------------------------------------------------------------------------


def recorder_of(pool: Pool) -> PoolRecorder | None:
    recorder: PoolRecorder | None = getattr(type(pool), _MARK, None)
    return recorder


def hook_pool(pool: Pool, recorder: PoolRecorder, slow_query_seconds: float = 0.0) -> None:
    check_supported()
    if recorder_of(pool) is recorder:
        return
    if recorder_of(pool) is not None:
        unhook_pool(pool)
    if not pool._initialized or pool._queue is None:
        raise TypeError(
            "poolwatch: this asyncpg pool is not initialised yet; watch the pool that "
            "`await asyncpg.create_pool(...)` returns"
        )
    if pool.is_closing():
        raise ValueError("poolwatch: this asyncpg pool is closed or closing")
    original = type(pool)
    # Holders a caller waited for in the queue, until its checkout counts them (``checkouts_queued``).
    queued_holders: set[Any] = set()
    pool.__class__ = _watched_class(original, recorder, queued_holders)
    _hook_queue(pool._queue, recorder, queued_holders)
    watched_driver_recorders.add(recorder)
    for holder in pool._holders:
        connection = holder._con
        if connection is not None and not connection.is_closed():
            watch_connection(connection, recorder)


def unhook_pool(pool: Pool) -> None:
    """Put the pool back as asyncpg made it."""
    recorder = recorder_of(pool)
    if recorder is None:
        return
    pool.__class__ = type(pool).__mro__[1]
    watched_driver_recorders.discard(recorder)
    queue = pool._queue
    if queue is not None:
        queue.__dict__.pop("get", None)
        queue.__dict__.pop("put_nowait", None)
    for holder in pool._holders:
        connection = holder._con
        if connection is not None:
            _unwatch_connection(connection, recorder)


def _watched_class(original: type[Pool], recorder: PoolRecorder, queued_holders: set[Any]) -> type[Pool]:
    open_checkouts = recorder.open_checkouts
    wait = recorder.wait
    bounds = wait.bounds
    first = wait.first
    capture_site = recorder.capture_site
    capture_stack = recorder.capture_stack
    get_request = current_request.get
    base_acquire = original._acquire
    base_connect = original._get_new_connection

    async def _acquire(self: Pool, timeout: float | None) -> Any:
        recorder.waits_started += 1
        started = perf_counter()
        # Before the first await: the frames above are the caller's (``async with pool.acquire()``
        # adds asyncpg's own, which the walk skips).
        site = borrow_site(2) if capture_site else None
        stack = borrow_stack(2) if capture_stack else None
        try:
            proxy = await base_acquire(self, timeout)
        except TimeoutError as error:
            # asyncpg's acquire timeout, not a TimeoutError from inside it (a connect's, a setup's).
            # Decided by where it was raised, never by the clock: uvloop's timers run on a
            # millisecond loop time cached per iteration, so the acquire timeout can fire before
            # ``timeout`` seconds have passed on ``perf_counter``.
            _failed_wait(recorder, started, timed_out=timeout is not None and not _from_a_holder(error))
            raise
        except BaseException as error:
            _failed_wait(recorder, started, timed_out=False)
            if isinstance(error, asyncio.CancelledError):
                # A client that gave up while waiting, counted apart from timeouts.
                _safely(recorder.wait_cancelled, route_label(get_request()))
            raise
        now = perf_counter()
        waited = now - started
        wait.counts[0 if waited <= first else bisect_left(bounds, waited)] += 1
        wait.total += waited
        try:
            holder = proxy._holder
            if queued_holders and holder in queued_holders:
                queued_holders.discard(holder)
                recorder.checkouts_queued += 1
            request = get_request()
            # The usage list is as long as the statement timer of SQLAlchemy's pools makes it.
            entry = (now, request, None, site, stack, holder, copy_context(), [0, 0.0, 0.0, 0.0, 0.0])
            if open_checkouts.setdefault(holder, entry) is entry:  # type: ignore[arg-type]
                recorder.checkouts += 1
                recorder.in_use += 1
                if recorder.in_use > recorder.peak_in_use:
                    recorder.peak_in_use = recorder.in_use
            if request is not None and request.response_started:
                recorder.count_after_response(request.route)
        except Exception as error:
            internal_errors.record("checkout", error)
        return proxy

    async def _get_new_connection(self: Pool) -> Any:
        started = perf_counter()
        recorder.opening += 1
        try:
            connection = await base_connect(self)
        except Exception as error:
            recorder.opening -= 1
            _safely(recorder.connect_failed, driver_error_class(error))
            raise
        except BaseException:
            recorder.opening -= 1
            raise
        recorder.opening -= 1
        try:
            recorder.connected(perf_counter() - started)
            watch_connection(connection, recorder)
        except Exception as error:
            internal_errors.record("connect", error)
        return connection

    namespace = {
        "__slots__": (),
        "__module__": original.__module__,
        "__qualname__": original.__qualname__,
        "__doc__": original.__doc__,
        "_acquire": _acquire,
        "_get_new_connection": _get_new_connection,
        _MARK: recorder,
    }
    return type(original.__name__, (original,), namespace)


def _hook_queue(queue: Any, recorder: PoolRecorder, queued_holders: set[Any]) -> None:
    original_get = queue.get
    original_put = queue.put_nowait
    checkin = _checkin_of(recorder)

    async def get() -> Any:
        if not queue.empty():
            return await original_get()
        # No free connection: this caller waits for one.
        recorder.queued += 1
        if recorder.queued > recorder.peak_queued:
            recorder.peak_queued = recorder.queued
        try:
            holder = await original_get()
        finally:
            recorder.queued -= 1
        # Counted by ``_acquire`` once the checkout succeeds (a failed one puts the holder back).
        queued_holders.add(holder)
        return holder

    def put_nowait(holder: Any) -> None:
        try:
            if queued_holders:
                queued_holders.discard(holder)
            checkin(holder)
        except Exception as error:
            internal_errors.record("checkin", error)
        original_put(holder)

    queue.get = get
    queue.put_nowait = put_nowait


def _checkin_of(recorder: PoolRecorder) -> Callable[[Any], None]:
    """The checkin of one pool's holders, the recorder's fields read once (see ``pool_hooks``)."""
    open_checkouts = recorder.open_checkouts
    leaked_records = recorder.leaked_records
    histograms_by_key = recorder.histograms_by_key
    histograms_for = recorder.histograms_for
    no_request_histograms = histograms_by_key[NO_REQUEST_KEY]
    thresholds = [t for t in (recorder.leak_threshold, recorder.held_idle_threshold) if t > 0]
    notable = min(thresholds, default=float("inf"))
    tracing = recorder.tracing

    def checkin(holder: Any) -> None:
        # The pop decides: a holder put back without a checkout of ours (start-up, a failed
        # acquire) finds nothing.
        entry = open_checkouts.pop(holder, None)
        if entry is None:
            return
        recorder.in_use -= 1
        held = perf_counter() - entry[0]
        request = entry[1]
        if request is None:
            key = NO_REQUEST_KEY
            use, idle_histogram, _ = no_request_histograms
        else:
            key = request.key or request.labels()
            # Read without the lock once made (one dict read); made under it the first time.
            use, idle_histogram, _ = histograms_by_key.get(key) or histograms_for(key)
        use.observe(held)
        idle = held - entry[7][1]
        idle_histogram.observe(idle)
        if tracing:
            found = exemplar(held)
            if found is not None:
                recorder.use_exemplars[key] = found
        if held > notable or (leaked_records and holder in leaked_records):
            recorder.returned_notably(CheckoutEntry(*entry), key, held, idle)

    return checkin


# -- per connection: statements and disconnects -------------------------------------------------

# connection -> (query logger, termination listener), so unwatching removes exactly ours.
_connection_callbacks: dict[int, tuple[Any, Any]] = {}


def watch_connection(connection: Any, recorder: PoolRecorder) -> None:
    key = id(connection)
    if key in _connection_callbacks:
        return
    histograms = recorder.query
    open_checkouts = recorder.open_checkouts
    get_request = current_request.get
    reset_query: list[str | None] = [None]

    def logged(record: Any) -> None:
        try:
            statement = record.query
            if reset_query[0] is None:
                reset_query[0] = connection.get_reset_query()
            if statement == reset_query[0]:
                return  # the pool's own reset at release, not the application's statement
            request = get_request()
            if request is not None:
                if request.scope.get("type") == _PROBE_SCOPE:
                    return  # /health/db's ping
                request.queries += 1
            elapsed = float(record.elapsed)
            holder_ref = getattr(connection, "_pool_holder", None)
            entry = open_checkouts.get(holder_ref()) if holder_ref is not None else None
            if entry is not None:
                usage = entry[7]
                usage[0] += 1
                usage[1] += elapsed
            operation = operation_cache.get(statement) or operation_of(statement)
            if record.exception is not None:
                recorder.query_failed(operation, driver_error_class(record.exception))
                return
            histogram = histograms[operation]
            histogram.counts[0 if elapsed <= histogram.first else bisect_left(histogram.bounds, elapsed)] += 1
            histogram.total += elapsed
            if recorder.tracing:
                found = exemplar(elapsed)
                if found is not None:
                    recorder.query_exemplars[operation] = found
        except Exception as error:
            internal_errors.record("statement", error)

    def terminated(_connection: Any) -> None:
        _connection_callbacks.pop(key, None)
        _safely(recorder.disconnected)

    _connection_callbacks[key] = (logged, terminated)
    connection.add_query_logger(logged)
    connection.add_termination_listener(terminated)


def _unwatch_connection(connection: Any, recorder: PoolRecorder) -> None:
    callbacks = _connection_callbacks.pop(id(connection), None)
    if callbacks is not None:
        connection.remove_query_logger(callbacks[0])
        connection.remove_termination_listener(callbacks[1])


# Everything an acquire does inside its timeout (connect, ``init``, ``setup``) runs under this.
_HOLDER_ACQUIRE = PoolConnectionHolder.acquire.__code__


def _from_a_holder(error: BaseException) -> bool:
    """Whether ``error`` was raised inside asyncpg's ``PoolConnectionHolder.acquire``: by a connect
    or a callback, not by the acquire's own timeout, which asyncpg raises above the holder."""
    traceback = error.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_code is _HOLDER_ACQUIRE:
            return True
        traceback = traceback.tb_next
    return False


def _failed_wait(recorder: PoolRecorder, started: float, *, timed_out: bool) -> None:
    try:
        recorder.wait_failed(started, timed_out)
    except Exception as error:
        internal_errors.record("wait_failed", error)


def _safely(call: Any, *args: Any) -> None:
    try:
        call(*args)
    except Exception as error:
        internal_errors.record("asyncpg", error)


__all__ = [
    "AsyncpgSource",
    "check_supported",
    "default_name",
    "hook_pool",
    "is_asyncpg_pool",
    "source_for",
    "unhook_pool",
]
