"""psycopg 3's own pools (``psycopg_pool.ConnectionPool``, ``AsyncConnectionPool``): poolwatch's
hooks on one pool, and the pool as a ``PoolSource``.

psycopg_pool's pools are plain instances (no ``__slots__``), and every way the application takes
or gives back a connection goes through the instance's ``getconn`` and ``putconn`` (its
``connection()`` context manager calls them on ``self``). A watched pool gets instance attributes
in front of those two and of two private steps, and nothing else; unwatching deletes them, so the
class's own methods answer again, and a pool nobody watches is never touched:

- ``getconn``: waits (queueing, and the pool's ``check`` callback when it has one), timeouts
  (``PoolTimeout``), cancelled waits (``CancelledError``), the checkout table and the borrow site,
  callers queued (``pending``) and checkouts that queued (``checkouts_queued``): a caller that finds
  no idle connection waits in psycopg_pool's queue, even while the pool opens one for it (as
  psycopg_pool's own ``requests_queued`` counts it);
- ``putconn``: the checkin (the connection is taken out of the table before psycopg resets it);
- ``_connect`` (run by the pool's workers): connects, connect time and connect errors;
- ``_close_connection``: disconnects, with the reason read from the pool step that closes it
  (expired: ``recycled``; ``reset``/rollback failed: ``reset_failed``; idle beyond ``min_size``:
  ``overflow``; ``close``/``drain``: ``disposed``; failed ``check()``: ``invalidated``).

Statements: psycopg 3 has no query logger, but a connection's ``cursor_factory`` is public. At a
connection's first watched checkout its ``cursor_factory`` becomes a subclass of the one it had,
made once per class, whose ``execute`` and ``executemany`` are timed (by operation, errors,
statements per request, time inside statements per checkout, so held-idle too). It keeps it (a
swap at every checkout and checkin cost more than the rest of the bookkeeping), and a statement
counts only while its connection is in the checkout table: the pool's own ``check`` and ``reset``
callbacks run while it is not. Unwatching gives every such connection, idle or out, its own
factory back. Cursors made otherwise (``copy()``, ``stream()``, named server-side cursors,
``conn.pipeline()`` batches timed as their ``execute`` calls) are not timed.

State is read at scrape time from the public ``get_stats()`` (``pool_size``, ``pool_available``)
and the sizes: idle is ``pool_available``, max is ``max_size``, overflow is connections open
beyond ``min_size``.

What psycopg_pool cannot give: connections reclaimed by the garbage collector (a connection never
given back is never returned by psycopg_pool: it shows as a leak), pre-ping (the pool's ``check``
callback runs inside the wait instead) and invalidations.
"""

from __future__ import annotations

import asyncio
import os
import re
import weakref
from bisect import bisect_left
from collections.abc import Callable
from contextvars import copy_context
from sys import _getframe as getframe
from typing import TYPE_CHECKING, Any

import psycopg_pool
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict

from .._log import internal_errors
from .._record.context import NO_REQUEST_KEY, current_request, route_label
from .._record.recorder import CheckoutEntry, perf_counter
from .._record.server import role_tag, server_label
from .._record.source import PoolState
from .borrow_site import borrow_site, borrow_stack, is_library_file
from .driver_errors import driver_error_class
from .sql import operation_cache, operation_of
from .tracing import exemplar
from .watched_drivers import UNAVAILABLE, UnsupportedVersion, check_version
from .watched_drivers import recorders as watched_driver_recorders

if TYPE_CHECKING:
    from .._record.recorder import PoolRecorder

# The versions whose private steps (``_connect``, ``_close_connection``, ``_pool``) poolwatch
# relies on. Tested: 3.3.
SUPPORTED = ((3, 2), (3, 3))
_HOOKED = ("getconn", "putconn", "_connect", "_close_connection")
_MARK = "_poolwatch_recorder"
_POOL_CLASSES = (psycopg_pool.ConnectionPool, psycopg_pool.AsyncConnectionPool)
# psycopg_pool names a pool "pool-<n>" when the application does not.
_GENERATED_NAME = re.compile(r"pool-\d+")

# The pool step that closes a connection, and the reason it is counted under.
_CLOSE_REASONS = {
    "_return_connection": "recycled",
    "_reset_connection": "reset_failed",
    "_shrink_pool": "overflow",
    "drain": "disposed",
    "close": "disposed",
    "_stop": "disposed",
    "_add_to_pool": "disposed",
    "_maybe_close_connection": "disposed",
    "check": "invalidated",
    "_check_connection": "invalidated",
}


def check_supported(version: str | None = None) -> None:
    """Refuse a psycopg_pool whose pools poolwatch does not know, with a message saying so."""
    missing = [
        f"{cls.__name__}.{name}" for cls in _POOL_CLASSES for name in (*_HOOKED, "get_stats")
        if not hasattr(cls, name)
    ]  # fmt: skip
    version = psycopg_pool.__version__ if version is None else version
    check_version("psycopg_pool", version, SUPPORTED, missing, "psycopg")


def is_psycopg_pool(candidate: object) -> bool:
    return isinstance(candidate, _POOL_CLASSES)


# -- the pool as a PoolSource --------------------------------------------------------------------


class PsycopgPoolSource:
    """A psycopg_pool pool as ``_record`` and ``_serve`` see it."""

    library = "psycopg_pool"
    # Families this library cannot give: exported as absent, never as a made-up zero.
    unavailable = UNAVAILABLE  # check() runs inside the wait; it is not a pre-ping
    dialect = "postgresql"
    driver = "psycopg"
    engine = None

    def __init__(self, pool: Any) -> None:
        self._pool: Any = pool
        self.is_async = isinstance(pool, psycopg_pool.AsyncConnectionPool)
        self.pool_class = f"psycopg_pool.{type(pool).__name__}"
        address = address_of(pool)
        self.server = server_label(address)
        self.role = role_tag(address)
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def pool(self) -> Any:
        return self._pool

    def forget(self) -> None:
        self._pool = None

    def read_state(self, live_count: int) -> PoolState:
        pool = self._pool
        if pool is None:
            return PoolState(used=live_count, idle=0, overflow=0, max=None, taken=live_count)
        stats = pool.get_stats()
        size = stats.get("pool_size", 0)  # connections the pool manages, those being opened included
        idle = stats.get("pool_available", 0)
        return PoolState(
            used=live_count,
            idle=max(0, idle),
            overflow=max(0, size - pool.min_size),
            max=pool.max_size,
            # Full when every connection it may have exists or is being opened, and none is idle.
            taken=max(size - idle, live_count),
        )

    def never_probed(self) -> bool:
        return False

    async def checkout_async(self) -> Any:
        return await self._live().getconn()

    async def ping_async(self, connection: Any) -> bool:
        cursor = await connection.execute("SELECT 1")
        row = await cursor.fetchone()
        await connection.rollback()  # back to idle: the pool's return path expects it
        return row is not None and row[0] == 1

    async def release_async(self, connection: Any) -> None:
        await self._live().putconn(connection)

    def checkout_sync(self) -> Any:
        return self._live().getconn()

    def ping_sync(self, connection: Any) -> bool:
        row = connection.execute("SELECT 1").fetchone()
        connection.rollback()
        return row is not None and row[0] == 1

    def release_sync(self, connection: Any) -> None:
        self._live().putconn(connection)

    def discard(self, connection: Any) -> None:
        """Close the socket without waiting on the server, then give the connection back: the
        pool sees it broken and opens a new one in its place."""
        pool = self._pool
        try:
            connection.pgconn.finish()
            if pool is None:
                return
            if self.is_async:
                task = asyncio.get_running_loop().create_task(pool.putconn(connection))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                pool.putconn(connection)
        except Exception as error:
            internal_errors.record("probe_discard", error)

    def _live(self) -> Any:
        pool = self._pool
        if pool is None:
            raise ReferenceError("pool released")
        return pool


def source_for(pool: Any) -> PsycopgPoolSource:
    return PsycopgPoolSource(pool)


class _Address:
    """host, port, database and user of a pool's connections, shaped like the SQLAlchemy URL that
    ``_record.server`` reads (the user name goes only into the role's keyed hash)."""

    def __init__(self, host: str, port: int, database: str, username: str) -> None:
        self.host, self.port, self.database, self.username = host, port, database, username

    def get_backend_name(self) -> str:
        return "postgresql"


def address_of(pool: Any) -> _Address:
    """Where the pool connects, from its conninfo and kwargs as libpq reads them (a callable
    conninfo or kwargs is never called: libpq's environment variables stand in)."""
    found: dict[str, Any] = {}
    conninfo = pool.conninfo if isinstance(pool.conninfo, str) else ""
    kwargs = pool.kwargs if isinstance(pool.kwargs, dict) else {}
    try:
        found = conninfo_to_dict(conninfo, **kwargs)
    except Exception as error:
        internal_errors.record("psycopg_conninfo", error)
    host = str(found.get("host") or os.environ.get("PGHOST") or "localhost").split(",")[0]
    if host.startswith("/"):
        host = "localhost"  # a Unix socket directory
    try:
        port = int(str(found.get("port") or os.environ.get("PGPORT") or 5432).split(",")[0])
    except ValueError:
        port = 5432
    user = str(found.get("user") or os.environ.get("PGUSER") or "")
    database = str(found.get("dbname") or os.environ.get("PGDATABASE") or user)
    return _Address(host, port, database, user)


def default_name(pool: Any) -> str:
    """The name the application gave the pool, else host:port/database (never a user name)."""
    name = getattr(pool, "name", None)
    if isinstance(name, str) and name and not _GENERATED_NAME.fullmatch(name):
        return name
    return server_label(address_of(pool))


# -- the hooks -----------------------------------------------------------------------------------


def recorder_of(pool: Any) -> PoolRecorder | None:
    recorder: PoolRecorder | None = pool.__dict__.get(_MARK)
    return recorder


def hook_pool(pool: Any, recorder: PoolRecorder) -> None:
    check_supported()
    if not is_psycopg_pool(pool):
        raise TypeError(f"poolwatch: not a psycopg_pool pool: {type(pool).__qualname__}")
    if recorder_of(pool) is recorder:
        return
    if recorder_of(pool) is not None:
        unhook_pool(pool)
    taken = set(pool.__dict__) & set(_HOOKED)
    if taken:
        raise TypeError(
            f"poolwatch: this psycopg_pool pool has its own {sorted(taken)} set on the instance; "
            "poolwatch cannot watch it without hiding them"
        )
    dressed: weakref.WeakSet[Any] = weakref.WeakSet()
    pool.__dict__.update(_hooks(pool, recorder, dressed))
    pool.__dict__[_DRESSED] = dressed
    pool.__dict__[_MARK] = recorder
    watched_driver_recorders.add(recorder)


def unhook_pool(pool: Any) -> None:
    """Put the pool back as psycopg_pool made it, and its connections their cursor factories."""
    recorder = pool.__dict__.pop(_MARK, None)
    for name in _HOOKED:
        pool.__dict__.pop(name, None)
    dressed = pool.__dict__.pop(_DRESSED, None)
    if recorder is not None:
        watched_driver_recorders.discard(recorder)
    # Idle ones and those still out (their putconn is psycopg_pool's now) alike, unless the
    # application set a factory of its own meanwhile.
    for connection in list(dressed or ()):
        base = getattr(getattr(connection, "cursor_factory", None), _BASE, None)
        if base is not None:
            connection.cursor_factory = base


_BASE = "_poolwatch_base"
# The connections given a timed cursor factory, kept on the watched pool (a weak set).
_DRESSED = "_poolwatch_timed_connections"
_PROBE_SCOPE = "poolwatch.probe"
_BROKEN = pq.ConnStatus.BAD


def _hooks(pool: Any, recorder: PoolRecorder, dressed: weakref.WeakSet[Any]) -> dict[str, Any]:
    """``getconn``, ``putconn``, ``_connect`` and ``_close_connection`` for one pool, async or not
    as the pool is.

    ``getconn`` and ``putconn`` run on every checkout and checkin, where a call costs as much as
    the work: as on SQLAlchemy's pools (``pool_hooks``), the bookkeeping is written out inside each
    of them (the async pair repeats the sync pair's lines: a shared helper is one more call per
    cycle), the recorder's fields in locals, histogram observations inline, the caller's frame
    tested for the borrow site before any walk, and no lock (see the recorder's docstring).

    Statements: a connection gets its timed cursor factory at its first watched checkout and keeps
    it (no swap per checkout); a statement counts only while its connection is in the checkout
    table, so the pool's own ``check`` and ``reset`` callbacks, run while it is not, are not the
    application's statements.
    """
    cls = type(pool)
    is_async = isinstance(pool, psycopg_pool.AsyncConnectionPool)
    base_getconn, base_putconn = cls.getconn, cls.putconn
    base_connect, base_close = cls._connect, cls._close_connection
    # The pool's deque of idle connections: made in its __init__, never replaced (3.2, 3.3).
    idle_connections = pool._pool
    open_checkouts = recorder.open_checkouts
    leaked_records = recorder.leaked_records
    histograms_by_key = recorder.histograms_by_key
    histograms_for = recorder.histograms_for
    # Work outside any request (workers, scripts, start-up) skips the keyed lookup.
    no_request_histograms = histograms_by_key[NO_REQUEST_KEY]
    query_histograms = recorder.query
    wait = recorder.wait
    wait_counts = wait.counts
    bounds = wait.bounds
    first = wait.first
    # A checkin held longer than this may be a leak or held idle too long: a closer look.
    thresholds = [t for t in (recorder.leak_threshold, recorder.held_idle_threshold) if t > 0]
    notable = min(thresholds, default=float("inf"))
    capture_site = recorder.capture_site
    capture_stack = recorder.capture_stack
    tracing = recorder.tracing
    get_request = current_request.get
    # cursor class -> its timed subclass; a timed class maps to itself.
    timed_factories: dict[Any, Any] = {}

    def dress(connection: Any, factory: Any) -> None:
        """The connection's cursor factory becomes a subclass of it, made once per class, whose
        ``execute``/``executemany`` are timed (unless the application changes it, it stays)."""
        timed = timed_factories.get(factory)
        if timed is None:
            timed = _timed_cursor(factory, statement, is_async)
            timed_factories[factory] = timed
            timed_factories[timed] = timed
        connection.cursor_factory = timed
        dressed.add(connection)

    def failed(started: float, error: BaseException) -> None:
        try:
            recorder.wait_failed(started, isinstance(error, psycopg_pool.PoolTimeout))
            if isinstance(error, asyncio.CancelledError):
                # A client that gave up while waiting, counted apart from timeouts.
                recorder.wait_cancelled(route_label(get_request()))
        except Exception as failure:
            internal_errors.record("wait_failed", failure)

    def statement(connection: Any, query: Any, elapsed: float, error: BaseException | None) -> None:
        try:
            entry = open_checkouts.get(connection)
            if entry is None:
                return  # not out of the pool: the pool's own check or reset
            request = get_request()
            if request is not None:
                if request.scope.get("type") == _PROBE_SCOPE:
                    return  # /health/db's ping
                request.queries += 1
            usage = entry[7]
            usage[0] += 1
            usage[1] += elapsed
            operation = _operation(query, connection)
            if error is not None:
                if isinstance(error, Exception):
                    recorder.query_failed(operation, driver_error_class(error))
                return
            histogram = query_histograms[operation]
            histogram.counts[0 if elapsed <= histogram.first else bisect_left(histogram.bounds, elapsed)] += 1
            histogram.total += elapsed
            if tracing:
                found = exemplar(elapsed)
                if found is not None:
                    recorder.query_exemplars[operation] = found
        except Exception as failure:
            internal_errors.record("statement", failure)

    def connect_failed(error: BaseException) -> None:
        recorder.opening -= 1
        if isinstance(error, Exception):
            _safely(recorder.connect_failed, driver_error_class(error))

    def connected(started: float) -> None:
        recorder.opening -= 1
        _safely(recorder.connected, perf_counter() - started)

    def closing(connection: Any, step: str) -> None:
        if not connection.closed:
            _safely(recorder.disconnected, _CLOSE_REASONS.get(step, "other"))

    if is_async:

        async def getconn(timeout: float | None = None) -> Any:
            # Before anything else: the caller's frame, tested inline (application code calling
            # getconn is common), else the walk past psycopg_pool's and contextlib's frames.
            site = None
            if capture_site:
                try:
                    caller = getframe(1)
                except ValueError:  # the root of a thread: no caller to name
                    caller = None
                if caller is not None:
                    code = caller.f_code
                    if is_library_file.get(code.co_filename) is False:
                        site = (code, caller.f_lasti)
                    else:
                        site = borrow_site(2)
            stack = borrow_stack(2) if capture_stack else None
            recorder.waits_started += 1
            # No idle connection as it asks: psycopg_pool queues it (its requests_queued).
            queued = not idle_connections
            if queued:
                recorder.queued += 1
                if recorder.queued > recorder.peak_queued:
                    recorder.peak_queued = recorder.queued
            started = perf_counter()
            try:
                connection = await base_getconn(pool, timeout)
            except BaseException as error:
                if queued:
                    recorder.queued -= 1
                failed(started, error)
                raise
            # Observed first: from here on this caller is not waiting.
            now = perf_counter()
            waited = now - started
            wait_counts[0 if waited <= first else bisect_left(bounds, waited)] += 1
            wait.total += waited
            if queued:
                recorder.queued -= 1
                recorder.checkouts_queued += 1
            try:
                request = get_request()
                # A plain tuple (see CheckoutEntry); the list is the usage the statement timer adds to.
                entry = (now, request, None, site, stack, connection, copy_context(), [0, 0.0, 0.0, 0.0, 0.0])
                if open_checkouts.setdefault(connection, entry) is entry:  # type: ignore[arg-type]
                    recorder.checkouts += 1
                    # No call between these statements: the count and its peak stay exact.
                    recorder.in_use += 1
                    if recorder.in_use > recorder.peak_in_use:
                        recorder.peak_in_use = recorder.in_use
                if request is not None and request.response_started:
                    recorder.count_after_response(request.route)
                factory = connection.cursor_factory
                if timed_factories.get(factory) is not factory:
                    dress(connection, factory)
            except Exception as error:
                internal_errors.record("checkout", error)
            return connection

        async def putconn(connection: Any) -> None:
            try:
                # The pop decides: a checkin counts once (a putconn of a connection taken before
                # poolwatch watched the pool finds nothing).
                entry = open_checkouts.pop(connection, None)
                if entry is not None:
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
                    use.counts[0 if held <= first else bisect_left(bounds, held)] += 1
                    use.total += held
                    idle = held - entry[7][1]
                    idle_histogram.counts[0 if idle <= first else bisect_left(bounds, idle)] += 1
                    idle_histogram.total += idle
                    if tracing:
                        found = exemplar(held)
                        if found is not None:
                            recorder.use_exemplars[key] = found
                    if held > notable or (leaked_records and connection in leaked_records):
                        recorder.returned_notably(CheckoutEntry(*entry), key, held, idle)
                if connection.pgconn.status == _BROKEN:
                    # psycopg_pool drops a connection that comes back broken without closing it again.
                    recorder.disconnected("invalidated")
            except Exception as error:
                internal_errors.record("checkin", error)

            await base_putconn(pool, connection)

        async def _connect(timeout: float | None = None) -> Any:
            started = perf_counter()
            recorder.opening += 1
            try:
                connection = await base_connect(pool, timeout)
            except BaseException as error:
                connect_failed(error)
                raise
            connected(started)
            return connection

        async def _close_connection(connection: Any) -> None:
            closing(connection, getframe(1).f_code.co_name)
            await base_close(pool, connection)

    else:

        def getconn(timeout: float | None = None) -> Any:  # type: ignore[misc]
            site = None
            if capture_site:
                try:
                    caller = getframe(1)
                except ValueError:  # the root of a thread: no caller to name
                    caller = None
                if caller is not None:
                    code = caller.f_code
                    if is_library_file.get(code.co_filename) is False:
                        site = (code, caller.f_lasti)
                    else:
                        site = borrow_site(2)
            stack = borrow_stack(2) if capture_stack else None
            recorder.waits_started += 1
            queued = not idle_connections
            if queued:
                recorder.queued += 1
                if recorder.queued > recorder.peak_queued:
                    recorder.peak_queued = recorder.queued
            started = perf_counter()
            try:
                connection = base_getconn(pool, timeout)
            except BaseException as error:
                if queued:
                    recorder.queued -= 1
                failed(started, error)
                raise
            # Observed first: from here on this caller is not waiting.
            now = perf_counter()
            waited = now - started
            wait_counts[0 if waited <= first else bisect_left(bounds, waited)] += 1
            wait.total += waited
            if queued:
                recorder.queued -= 1
                recorder.checkouts_queued += 1
            try:
                request = get_request()
                # A plain tuple (see CheckoutEntry); the list is the usage the statement timer adds to.
                entry = (now, request, None, site, stack, connection, copy_context(), [0, 0.0, 0.0, 0.0, 0.0])
                if open_checkouts.setdefault(connection, entry) is entry:  # type: ignore[arg-type]
                    recorder.checkouts += 1
                    # No call between these statements: the count and its peak stay exact.
                    recorder.in_use += 1
                    if recorder.in_use > recorder.peak_in_use:
                        recorder.peak_in_use = recorder.in_use
                if request is not None and request.response_started:
                    recorder.count_after_response(request.route)
                factory = connection.cursor_factory
                if timed_factories.get(factory) is not factory:
                    dress(connection, factory)
            except Exception as error:
                internal_errors.record("checkout", error)
            return connection

        def putconn(connection: Any) -> None:  # type: ignore[misc]
            try:
                # The pop decides: a checkin counts once (a putconn of a connection taken before
                # poolwatch watched the pool finds nothing).
                entry = open_checkouts.pop(connection, None)
                if entry is not None:
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
                    use.counts[0 if held <= first else bisect_left(bounds, held)] += 1
                    use.total += held
                    idle = held - entry[7][1]
                    idle_histogram.counts[0 if idle <= first else bisect_left(bounds, idle)] += 1
                    idle_histogram.total += idle
                    if tracing:
                        found = exemplar(held)
                        if found is not None:
                            recorder.use_exemplars[key] = found
                    if held > notable or (leaked_records and connection in leaked_records):
                        recorder.returned_notably(CheckoutEntry(*entry), key, held, idle)
                if connection.pgconn.status == _BROKEN:
                    # psycopg_pool drops a connection that comes back broken without closing it again.
                    recorder.disconnected("invalidated")
            except Exception as error:
                internal_errors.record("checkin", error)

            base_putconn(pool, connection)

        def _connect(timeout: float | None = None) -> Any:  # type: ignore[misc]
            started = perf_counter()
            recorder.opening += 1
            try:
                connection = base_connect(pool, timeout)
            except BaseException as error:
                connect_failed(error)
                raise
            connected(started)
            return connection

        def _close_connection(connection: Any) -> None:  # type: ignore[misc]
            closing(connection, getframe(1).f_code.co_name)
            base_close(pool, connection)

    return {
        "getconn": getconn,
        "putconn": putconn,
        "_connect": _connect,
        "_close_connection": _close_connection,
    }


def _operation(query: Any, connection: Any) -> str:
    if isinstance(query, bytes):
        query = query.decode("utf-8", "replace")
    elif not isinstance(query, str):
        as_string = getattr(query, "as_string", None)  # psycopg.sql.Composable
        if as_string is None:
            return "OTHER"  # a t-string Template: its text is not composed here
        query = as_string(connection)
    found: str | None = operation_cache.get(query)
    return found or operation_of(query)


Statement = Callable[[Any, Any, float, "BaseException | None"], None]


def _timed_cursor(factory: Any, statement: Statement, is_async: bool) -> type:
    """A subclass of the connection's cursor class whose ``execute``/``executemany`` are timed."""
    if is_async:

        async def execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            started = perf_counter()
            try:
                result = await factory.execute(self, query, *args, **kwargs)
            except BaseException as error:
                statement(self._conn, query, perf_counter() - started, error)
                raise
            statement(self._conn, query, perf_counter() - started, None)
            return result

        async def executemany(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            started = perf_counter()
            try:
                result = await factory.executemany(self, query, *args, **kwargs)
            except BaseException as error:
                statement(self._conn, query, perf_counter() - started, error)
                raise
            statement(self._conn, query, perf_counter() - started, None)
            return result

    else:

        def execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
            started = perf_counter()
            try:
                result = factory.execute(self, query, *args, **kwargs)
            except BaseException as error:
                statement(self._conn, query, perf_counter() - started, error)
                raise
            statement(self._conn, query, perf_counter() - started, None)
            return result

        def executemany(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
            started = perf_counter()
            try:
                result = factory.executemany(self, query, *args, **kwargs)
            except BaseException as error:
                statement(self._conn, query, perf_counter() - started, error)
                raise
            statement(self._conn, query, perf_counter() - started, None)
            return result

    namespace = {
        "__slots__": (),
        "__module__": factory.__module__,
        "__qualname__": factory.__qualname__,
        "__doc__": factory.__doc__,
        "execute": execute,
        "executemany": executemany,
        _BASE: factory,
    }
    return type(factory.__name__, (factory,), namespace)


def _safely(call: Any, *args: Any) -> None:
    try:
        call(*args)
    except Exception as error:
        internal_errors.record("psycopg_pool", error)


__all__ = [
    "PsycopgPoolSource",
    "UnsupportedVersion",
    "check_supported",
    "default_name",
    "hook_pool",
    "is_psycopg_pool",
    "source_for",
    "unhook_pool",
]
