"""The acquisition wrapper: poolwatch's own hooks on a pool instance.

SQLAlchemy has no event for waiting, so pending callers, wait time and timeouts need a wrapper
around ``Pool.connect``. Wrapping ``connect`` and ``_do_return_conn`` also replaces the
``checkout``/``checkin`` event listeners, whose dispatch alone costs more than all of our
bookkeeping. ``_invoke_creator`` and ``_close_connection`` are the single places where every pool
class opens and closes DBAPI connections, detached ones included.

Hooks are instance attributes, so they vanish with the pool; ``engine.dispose()`` builds a new pool,
and the ``engine_disposed`` listener (in ``_listeners``) hooks that one too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc

from ._log import internal_errors
from ._recorder import perf_counter

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

    def connect() -> Any:
        try:
            recorder.wait_started()
        except Exception as error:
            internal_errors.record("wait_started", error)
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
            recorder.checked_out(fairy, started)
        except Exception as error:
            internal_errors.record("checkout", error)
        return fairy

    def do_return_conn(record: Any) -> None:
        try:
            recorder.checked_in(record)
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
    pool._invoke_creator = invoke_creator
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


def _failed_wait(recorder: PoolRecorder, started: float, *, timed_out: bool) -> None:
    try:
        recorder.wait_failed(started, timed_out)
    except Exception as error:
        internal_errors.record("wait_failed", error)
