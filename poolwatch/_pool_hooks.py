"""The acquisition wrapper: poolwatch's own hooks on a pool instance.

SQLAlchemy has no event for waiting, so pending callers, wait time and timeouts need a wrapper
around ``Pool.connect``. Wrapping ``connect`` and ``_do_return_conn`` also replaces the
``checkout``/``checkin`` event listeners, whose dispatch alone costs more than all of our
bookkeeping. ``_invoke_creator`` and ``_close_connection`` are the single places where every pool
class opens and closes DBAPI connections, detached ones included.

Hooks are instance attributes, so they vanish with the pool; ``engine.dispose()`` builds a new pool,
and poolwatch's wrapper on the engine's ``dispose`` (in ``_listeners``) hooks that one too.
"""

from __future__ import annotations

from bisect import bisect_left
from sys import _getframe as getframe
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc

from ._borrow_site import borrow_site, borrow_stack, is_library_code
from ._context import NO_REQUEST, current_request
from ._histogram import Histogram
from ._log import internal_errors
from ._recorder import CheckoutEntry, Exemplar, perf_counter
from ._tracing import exemplar

if TYPE_CHECKING:
    from sqlalchemy.pool import Pool

    from ._recorder import PoolRecorder

_MARK = "_poolwatch_recorder"


def hook_pool(pool: Pool, recorder: PoolRecorder) -> None:
    """Install the hooks on ``pool``; a pool already hooked by this recorder is left alone."""
    if getattr(pool, _MARK, None) is recorder:
        return
    if getattr(pool, _MARK, None) is not None:
        unhook_pool(pool)

    original_connect = pool.connect
    original_return = pool._do_return_conn
    original_creator = pool._invoke_creator
    original_close = pool._close_connection

    # The two functions below run on every checkout and checkin. They keep the bookkeeping inline
    # (one Python frame each, locals instead of attribute lookups) because on this path a call
    # costs as much as the work; the recorder owns the state and everything that is not per-event.
    waits_started = recorder.waits_started
    waits_finished = recorder.waits_finished
    open_checkouts = recorder.open_checkouts
    leaked_records = recorder.leaked_records
    use_by_route = recorder.use
    wait = recorder.wait
    acquire = recorder.lock.acquire
    release = recorder.lock.release
    get_request = current_request.get

    def connect() -> Any:
        next(waits_started)
        started = perf_counter()
        try:
            fairy = original_connect()
        except sa_exc.TimeoutError:
            _failed_wait(recorder, started, timed_out=True)
            raise
        except BaseException:
            _failed_wait(recorder, started, timed_out=False)
            raise
        try:
            now = perf_counter()
            waited = now - started
            record = fairy._connection_record
            request = get_request()
            site = None
            if recorder.capture_site:
                # The caller's frame is tested inline: when it is application code (a direct
                # pool.connect()) that saves the call into the borrow-site walk.
                try:
                    caller = getframe(1)
                except ValueError:  # connect() is the root of a greenlet or thread: no caller
                    caller = None
                if caller is not None and is_library_code.get(caller.f_code) is False:
                    site = (caller.f_code, caller.f_lasti)
                elif caller is not None:
                    site = borrow_site(2)
            # A plain tuple (see CheckoutEntry), built before the lock: see _recorder's docstring.
            entry = (
                now,
                request,
                record.fairy_ref,
                site,
                borrow_stack(2) if recorder.capture_stack else None,
            )
            acquire()
            try:
                wait.counts[bisect_left(wait.bounds, waited)] += 1
                wait.total += waited
                if record not in open_checkouts:  # else handed out again (SingletonThreadPool)
                    recorder.checkouts += 1
                    open_checkouts[record] = entry  # type: ignore[assignment]
            finally:
                release()
            if request is not None and request.response_started:
                recorder.count_after_response(request.route)
        except Exception as error:
            internal_errors.record("checkout", error)
        finally:
            # Whatever failed above, this caller is no longer waiting.
            next(waits_finished)
        return fairy

    def do_return_conn(record: Any) -> None:
        try:
            entry = open_checkouts.get(record)
            if entry is not None:  # else taken before poolwatch was installed
                held = perf_counter() - entry[0]
                request = entry[1]
                fairy_ref = entry[2]
                # Resolving a route may allocate, so it happens before taking the lock.
                route = NO_REQUEST if request is None else (request.resolved_route or request.route)
                use = use_by_route.get(route)
                if use is None:
                    use = use_by_route.setdefault(route, Histogram())
                reclaimed = fairy_ref is not None and fairy_ref() is None
                acquire()
                try:
                    counted = open_checkouts.pop(record, None) is not None
                    if counted:
                        recorder.checkins += 1
                        use.counts[bisect_left(use.bounds, held)] += 1
                        use.total += held
                        if reclaimed:
                            recorder.gc_reclaimed[route] = recorder.gc_reclaimed.get(route, 0) + 1
                finally:
                    release()
                if counted and recorder.tracing:
                    _keep_exemplar(recorder.use_exemplars, route, held)
                if counted and (reclaimed or (leaked_records and record in leaked_records)):
                    leaked_records.discard(record)
                    recorder.returned_notably(CheckoutEntry(*entry), route, held, reclaimed)
        except Exception as error:
            internal_errors.record("checkin", error)
        original_return(record)

    def invoke_creator(record: Any) -> Any:
        started = perf_counter()
        connection = original_creator(record)
        try:
            recorder.connected(perf_counter() - started)
        except Exception as error:
            internal_errors.record("connect", error)
        return connection

    def close_connection(connection: Any, *, terminate: bool = False) -> None:
        try:
            original_close(connection, terminate=terminate)
        finally:
            try:
                recorder.disconnected()
            except Exception as error:
                internal_errors.record("disconnect", error)

    pool.connect = connect  # type: ignore[method-assign]
    pool._do_return_conn = do_return_conn  # type: ignore[method-assign]
    pool._invoke_creator = invoke_creator  # type: ignore[assignment]
    pool._close_connection = close_connection  # type: ignore[method-assign]
    setattr(pool, _MARK, recorder)


def unhook_pool(pool: Pool) -> None:
    """Put the pool back as SQLAlchemy made it (its class attributes show through again)."""
    if getattr(pool, _MARK, None) is None:
        return
    for name in ("connect", "_do_return_conn", "_close_connection"):
        pool.__dict__.pop(name, None)
    # _invoke_creator is SQLAlchemy's own instance attribute; its setter rebuilds it unwrapped.
    pool._creator = pool._creator
    delattr(pool, _MARK)


def _keep_exemplar(exemplars: dict[str, Exemplar], key: str, value: float) -> None:
    found = exemplar(value)
    if found is not None:
        exemplars[key] = found


def _failed_wait(recorder: PoolRecorder, started: float, *, timed_out: bool) -> None:
    try:
        recorder.wait_failed(started, timed_out)
    except Exception as error:
        internal_errors.record("wait_failed", error)
