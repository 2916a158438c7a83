"""Statement timing and pre-ping failures, from wrappers on the engine's dialect instance.

Why not ``before_cursor_execute``/``after_cursor_execute``/``handle_error``: any ConnectionEvents
listener flips ``engine._has_events``, which moves *every* statement onto SQLAlchemy's slower
event-checking path (measured: +7 us per statement before a listener does any work). Wrapping
``do_execute``/``do_executemany``/``do_execute_no_params`` on the dialect instance times exactly the
driver call, in one Python frame, and leaves SQLAlchemy's fast path alone. ``do_ping`` is what the
pool's pre-ping calls, so a failure there is a pre-ping failure. ``connect`` is what the engine's
creator calls to open a DBAPI connection (looked up on the dialect at each call), so a failure there
is a failed attempt to connect; an engine made with its own ``creator=`` bypasses it.

Each statement's time is also added to its checkout's usage (``CheckoutEntry.usage``), found from
the execution context's pool connection: held time minus that is the time held idle. So is the time
of a statement that raised or was cancelled (a ``statement_timeout``, a cancelled task: the
connection waited on the database all the same), and, for a statement on a server-side cursor, the
time of its row fetches (``streamed_rows``), where such a query spends its time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._log import internal_errors
from .._record.context import current_request, route_label
from .._record.events import SlowQuery, emit
from .._record.recorder import perf_counter
from .driver_errors import driver_error_class
from .sql import fingerprint, operation_cache, operation_of
from .streamed_rows import time_fetches
from .tracing import exemplar

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import Dialect

    from .._record.recorder import PoolRecorder

_MARK = "_poolwatch_recorder"
_WRAPPED = ("do_execute", "do_executemany", "do_execute_no_params", "do_ping", "connect")


def hook_dialect(dialect: Dialect, recorder: PoolRecorder, slow_query_seconds: float) -> None:
    if getattr(dialect, _MARK, None) is recorder:
        return
    unhook_dialect(dialect)
    timed = _StatementTimer(recorder, slow_query_seconds)
    original_execute = dialect.do_execute
    original_executemany = dialect.do_executemany
    original_no_params = dialect.do_execute_no_params
    original_ping = dialect.do_ping
    original_connect = dialect.connect
    around = timed.around
    finished = timed.finished

    # The common case, written out in full: one frame and no argument packing per statement.
    def do_execute(cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        started = perf_counter()
        try:
            original_execute(cursor, statement, parameters, context)
        except BaseException as error:
            _query_failed(recorder, statement, error, perf_counter() - started, context)
            raise
        finished(statement, perf_counter() - started, context)

    def do_executemany(cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        around(original_executemany, statement, context, cursor, statement, parameters, context)

    def do_execute_no_params(cursor: Any, statement: str, context: Any = None) -> None:
        around(original_no_params, statement, context, cursor, statement, context)

    def connect(*cargs: Any, **cparams: Any) -> Any:
        # Connections being opened now (poolwatch_connections_opening): not queueing.
        recorder.opening += 1
        try:
            return original_connect(*cargs, **cparams)
        except Exception as error:
            # A cancelled caller (a BaseException) is not a failed attempt to connect.
            _connect_failed(recorder, error)
            raise
        finally:
            recorder.opening -= 1

    def do_ping(dbapi_connection: Any) -> bool:
        # Pre-pings in flight now: not queueing either.
        recorder.pinging += 1
        try:
            alive = original_ping(dbapi_connection)
        except Exception as error:
            # Only an Exception says the connection is dead. A cancelled caller (asyncio's
            # CancelledError, greenlet's GreenletExit, KeyboardInterrupt) is a BaseException:
            # the client went away, the connection did not.
            _pre_ping_failed(recorder, dbapi_connection, type(error).__name__)
            raise
        finally:
            recorder.pinging -= 1
        if not alive:
            _pre_ping_failed(recorder, dbapi_connection, "PingReturnedFalse")
        return alive

    dialect.do_execute = do_execute  # type: ignore[method-assign]
    dialect.do_executemany = do_executemany  # type: ignore[method-assign]
    dialect.do_execute_no_params = do_execute_no_params  # type: ignore[method-assign]
    dialect.do_ping = do_ping  # type: ignore[method-assign]
    dialect.connect = connect  # type: ignore[method-assign]
    setattr(dialect, _MARK, recorder)


def unhook_dialect(dialect: Dialect) -> None:
    if getattr(dialect, _MARK, None) is None:
        return
    for name in _WRAPPED:
        dialect.__dict__.pop(name, None)
    delattr(dialect, _MARK)


class _StatementTimer:
    """Times one driver call and files it under its operation; counts it for the request and adds
    it to its checkout's usage."""

    def __init__(self, recorder: PoolRecorder, slow_query_seconds: float) -> None:
        histograms = recorder.query
        open_checkouts = recorder.open_checkouts
        get_request = current_request.get
        slow = slow_query_seconds
        tracing = recorder.tracing
        exemplars = recorder.query_exemplars

        # Closures rather than methods: locals are the cheapest lookups on a per-statement path.
        def finished(statement: str, elapsed: float, context: Any) -> None:
            try:
                request = get_request()
                if request is not None:
                    request.queries += 1
                operation = operation_cache.get(statement) or operation_of(statement)
                histogram = histograms[operation]
                # Lock-free, as on the checkout path (see the histogram module).
                bucket = 0 if elapsed <= histogram.first else bisect_left(histogram.bounds, elapsed)
                histogram.counts[bucket] += 1
                histogram.total += elapsed
                if context is not None:
                    try:
                        connection_record = context._dbapi_connection._connection_record
                        server_side = context._is_server_side
                    except AttributeError:  # a context that is not SQLAlchemy's default one
                        connection_record = None
                    entry = open_checkouts.get(connection_record)
                    if entry is None:
                        # A pool that shares one record among checkouts keys them by their proxy.
                        entry = open_checkouts.get(id(context._dbapi_connection))
                    if entry is not None:
                        usage = entry[7]
                        usage[0] += 1
                        usage[1] += elapsed
                        if server_side:  # the query runs as its rows are fetched
                            time_fetches(context, usage)
                if tracing:
                    found = exemplar(elapsed)
                    if found is not None:
                        exemplars[operation] = found
                if slow and elapsed >= slow:
                    _log_slow_query(recorder, statement, elapsed, slow)
            except Exception as failure:
                internal_errors.record("statement", failure)

        def around(call: Callable[..., Any], statement: str, context: Any, *args: Any) -> Any:
            started = perf_counter()
            try:
                result = call(*args)
            except BaseException as error:
                _query_failed(recorder, statement, error, perf_counter() - started, context)
                raise
            finished(statement, perf_counter() - started, context)
            return result

        self.finished = finished
        self.around = around


def _query_failed(
    recorder: PoolRecorder, statement: str, error: BaseException, elapsed: float, context: Any
) -> None:
    """A statement that raised or was cancelled: counted, and its time added to its checkout's
    usage, since the connection waited on the database for it as for any other."""
    try:
        request = current_request.get()
        if request is not None:
            request.queries += 1
        if context is not None:
            try:
                connection_record = context._dbapi_connection._connection_record
            except AttributeError:  # a context that is not SQLAlchemy's default one
                connection_record = None
            entry = recorder.open_checkouts.get(connection_record)
            if entry is None:
                entry = recorder.open_checkouts.get(id(getattr(context, "_dbapi_connection", None)))
            if entry is not None:
                usage = entry[7]
                usage[0] += 1
                usage[1] += elapsed
        recorder.query_failed(operation_of(statement), type(error).__name__)
    except Exception as failure:
        internal_errors.record("query_failed", failure)


def _connect_failed(recorder: PoolRecorder, error: Exception) -> None:
    try:
        # The driver's own class (asyncpg's InvalidCatalogNameError), not an adapter's Error.
        recorder.connect_failed(driver_error_class(error))
    except Exception as failure:
        internal_errors.record("connect_failed", failure)


def _pre_ping_failed(recorder: PoolRecorder, dbapi_connection: Any, error: str) -> None:
    try:
        recorder.pre_ping_failed(error, dbapi_connection)
    except Exception as failure:
        internal_errors.record("pre_ping", failure)


def _log_slow_query(recorder: PoolRecorder, statement: str, elapsed: float, threshold: float) -> None:
    slow = SlowQuery(
        pool=recorder.name,
        route=route_label(current_request.get()),
        operation=operation_of(statement),
        seconds=elapsed,
        threshold_seconds=threshold,
        fingerprint=fingerprint(statement),
    )
    emit(slow)
