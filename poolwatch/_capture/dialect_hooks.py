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
from .._record.holds import close_stretch
from .._record.recorder import perf_counter
from .driver_errors import driver_error_class
from .sql import fingerprint, operation_cache, operation_of
from .streamed_rows import time_fetches
from .tracing import exemplar
from .transactions import FLAG, LIBPQ_STATUS, TransactionReader, is_open, transaction_reader

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import Dialect

    from .._record.recorder import PoolRecorder

_MARK = "_poolwatch_recorder"
_WRAPPED = (
    "do_execute", "do_executemany", "do_execute_no_params", "do_ping", "connect", "do_commit", "do_rollback"
)  # fmt: skip


def hook_dialect(dialect: Dialect, recorder: PoolRecorder, slow_query_seconds: float) -> None:
    if getattr(dialect, _MARK, None) is recorder:
        return
    unhook_dialect(dialect)
    read_transaction = transaction_reader(dialect)
    hook_ends = None if read_transaction is None else _transaction_ends(dialect, recorder)
    timed = _StatementTimer(recorder, slow_query_seconds, read_transaction, hook_ends)
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
            _query_failed(recorder, statement, error, started, context, read_transaction)
            raise
        finished(statement, started, context)

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


def _transaction_ends(dialect: Dialect, recorder: PoolRecorder) -> Callable[[], bool]:
    """A commit or rollback ends the open transaction's idle stretch (``_record.holds``): at its
    start, since the round trip is not idle.

    Returns what installs the two wrappers. They go on when the first statement leaves a
    transaction open, not before: the pool's reset on return calls ``do_rollback`` at every
    checkin, and until a transaction has been seen there is no stretch to end (a pool used without
    statements, or only in autocommit, never pays for them). A stretch still open at checkin is
    ended there.
    """
    original_commit = dialect.do_commit
    original_rollback = dialect.do_rollback
    open_checkouts = recorder.open_checkouts

    def end_stretch(connection: Any) -> None:
        try:
            # SQLAlchemy passes the pool's proxy; a pool sharing records keys it by its id.
            entry = open_checkouts.get(getattr(connection, "_connection_record", None))
            if entry is None:
                entry = open_checkouts.get(id(connection))
            if entry is not None and entry[7][3]:
                close_stretch(entry[7], perf_counter())
        except Exception as error:
            internal_errors.record("transaction_end", error)

    def do_commit(dbapi_connection: Any) -> None:
        end_stretch(dbapi_connection)
        original_commit(dbapi_connection)

    def do_rollback(dbapi_connection: Any) -> None:
        end_stretch(dbapi_connection)
        original_rollback(dbapi_connection)

    def install() -> bool:
        """Put the two wrappers in place; False (to be asked again later) while something else has
        put its own on the dialect since poolwatch hooked it (a test's ``mock.patch.object``, say):
        that one is never replaced, and sees every call it would have seen without poolwatch."""
        # Idempotent: two threads installing at once put the same two functions in place.
        if getattr(dialect, _MARK, None) is not recorder:
            return True
        present = dialect.__dict__
        if present.get("do_commit", do_commit) is not do_commit or (
            present.get("do_rollback", do_rollback) is not do_rollback
        ):
            return False
        dialect.do_commit = do_commit  # type: ignore[method-assign]
        dialect.do_rollback = do_rollback  # type: ignore[method-assign]
        return True

    return install


def unhook_dialect(dialect: Dialect) -> None:
    if getattr(dialect, _MARK, None) is None:
        return
    for name in _WRAPPED:
        dialect.__dict__.pop(name, None)
    delattr(dialect, _MARK)


class _StatementTimer:
    """Times one driver call and files it under its operation; counts it for the request and adds
    it to its checkout's usage."""

    def __init__(
        self,
        recorder: PoolRecorder,
        slow_query_seconds: float,
        read_transaction: TransactionReader | None,
        hook_ends: Callable[[], bool] | None,
    ) -> None:
        ends_hooked = [hook_ends is None]
        read_state = None if read_transaction is None else read_transaction[0]
        mode = LIBPQ_STATUS if read_transaction is None else read_transaction[1]
        histograms = recorder.query
        open_checkouts = recorder.open_checkouts
        get_request = current_request.get
        slow = slow_query_seconds
        tracing = recorder.tracing
        exemplars = recorder.query_exemplars

        # Closures rather than methods: locals are the cheapest lookups on a per-statement path.
        def finished(statement: str, started: float, context: Any) -> None:
            nonlocal read_state
            ended = perf_counter()
            elapsed = ended - started
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
                        proxy = context._dbapi_connection
                        connection_record = proxy._connection_record
                        server_side = context._is_server_side
                    except AttributeError:  # a context that is not SQLAlchemy's default one
                        connection_record = proxy = None
                    entry = open_checkouts.get(connection_record)
                    if entry is None:
                        # A pool that shares one record among checkouts keys them by their proxy.
                        entry = open_checkouts.get(id(proxy))
                    if entry is not None:
                        usage = entry[7]
                        began = usage[3]
                        if began:  # idle inside a transaction since the last statement ended
                            usage[2] += (started - began) - (usage[1] - usage[4])
                        usage[0] += 1
                        usage[1] += elapsed
                        if server_side:  # the query runs as its rows are fetched
                            time_fetches(context, usage)
                        # Still (or now) inside a transaction: idle from here is idle in it. Read
                        # inline (``transactions.is_open``): no Python call per statement.
                        in_transaction = False
                        if read_state is not None:
                            try:
                                state = read_state(proxy.dbapi_connection)
                            except AttributeError as error:  # not the driver's usual shape: stop
                                read_state = None
                                internal_errors.record("transaction_status", error)
                            else:
                                if mode == LIBPQ_STATUS:
                                    in_transaction = state == 2 or state == 3
                                elif mode == FLAG:
                                    in_transaction = state is True
                                else:
                                    in_transaction = is_open(state, mode)
                        if in_transaction:
                            usage[3] = ended
                            usage[4] = usage[1]
                            if not ends_hooked[0]:
                                ends_hooked[0] = hook_ends()  # type: ignore[misc]
                        else:
                            usage[3] = 0.0
                if tracing:
                    found = exemplar(elapsed)
                    if found is not None:
                        exemplars[operation] = found
                if slow and elapsed > slow:  # slower than the setting, as documented
                    _log_slow_query(recorder, statement, elapsed, slow)
            except Exception as failure:
                internal_errors.record("statement", failure)

        def around(call: Callable[..., Any], statement: str, context: Any, *args: Any) -> Any:
            started = perf_counter()
            try:
                result = call(*args)
            except BaseException as error:
                _query_failed(recorder, statement, error, started, context, read_transaction)
                raise
            finished(statement, started, context)
            return result

        self.finished = finished
        self.around = around


def _query_failed(
    recorder: PoolRecorder,
    statement: str,
    error: BaseException,
    started: float,
    context: Any,
    read_transaction: TransactionReader | None,
) -> None:
    """A statement that raised or was cancelled: counted, and its time added to its checkout's
    usage, since the connection waited on the database for it as for any other. A transaction a
    failed statement leaves open (aborted) is still open: idle in it counts."""
    ended = perf_counter()
    elapsed = ended - started
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
                close_stretch(usage, started)
                usage[0] += 1
                usage[1] += elapsed
                proxy = getattr(context, "_dbapi_connection", None)
                if read_transaction is not None and _still_open(read_transaction, proxy):
                    usage[3] = ended
                    usage[4] = usage[1]
        recorder.query_failed(operation_of(statement), type(error).__name__)
    except Exception as failure:
        internal_errors.record("query_failed", failure)


def _still_open(read_transaction: TransactionReader, proxy: Any) -> bool:
    try:
        read_state, mode = read_transaction
        return is_open(read_state(proxy.dbapi_connection), mode)
    except Exception:  # a connection the failure broke: no transaction to speak of
        return False


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
