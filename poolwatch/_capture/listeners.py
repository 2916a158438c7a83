"""SQLAlchemy pool event listeners: invalidations, and new DBAPI connections.

Only PoolEvents are used: registered on the engine they travel with the pool through
``engine.dispose()`` (SQLAlchemy hands the dispatch to the recreated pool), and unlike
ConnectionEvents they leave the statement path untouched (see ``_dialect_hooks``). None of them
fires per checkout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc

from .._log import swallowing
from .pool_hooks import watched_by

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from .._record.recorder import PoolRecorder

# Exception class names that say only "the driver failed"; the cause underneath says how.
_GENERIC = frozenset({"Error", "DatabaseError", "InterfaceError", "OperationalError", "DBAPIError"})


class EngineListeners:
    """What poolwatch attaches to one engine besides the pool hooks, kept to be taken off again."""

    def __init__(self, recorder: PoolRecorder) -> None:
        self.recorder = recorder
        self._registered: list[tuple[str, Callable[..., Any]]] = []

    def install(self, engine: Engine) -> None:
        recorder = self.recorder

        @swallowing("invalidate")
        def on_invalidate(dbapi_connection: Any, record: Any, exception: Any) -> None:
            if watched_by(record, recorder):
                reason = "explicit" if exception is None else invalidation_reason(exception)
                recorder.invalidated(recorder.invalidation_reason_for(dbapi_connection, reason))

        @swallowing("soft_invalidate")
        def on_soft_invalidate(dbapi_connection: Any, record: Any, exception: Any) -> None:
            if watched_by(record, recorder):
                recorder.invalidated("soft")

        @swallowing("connect")
        def on_connect(dbapi_connection: Any, record: Any) -> None:
            if not watched_by(record, recorder):
                return
            # SQLAlchemy stamps the record with time.time() just before it calls the creator.
            started = getattr(record, "starttime", None)
            elapsed = time.time() - started if isinstance(started, float) else 0.0
            recorder.connected(max(0.0, elapsed))

        for name, function in (
            ("invalidate", on_invalidate),
            ("soft_invalidate", on_soft_invalidate),
            ("connect", on_connect),
        ):
            event.listen(engine, name, function)
            self._registered.append((name, function))

    def remove(self, engine: Engine) -> None:
        for name, function in self._registered:
            if event.contains(engine, name, function):
                event.remove(engine, name, function)
        self._registered.clear()


def invalidation_reason(exception: BaseException) -> str:
    """The most specific class name available for why a connection was invalidated.

    SQLAlchemy wraps the driver's exception (``DBAPIError.orig``), and async adapters wrap it again
    in generic classes such as asyncpg's adapted ``Error``; the driver's own class underneath
    (``ConnectionDoesNotExistError``) is what an operator can act on.
    """
    current: BaseException = exception
    for _ in range(4):  # a short chain: a cycle or a deep one is not worth following
        if isinstance(current, sa_exc.DBAPIError) and current.orig is not None:
            inner: BaseException | None = current.orig
        elif type(current).__name__ in _GENERIC:
            inner = current.__cause__ or current.__context__
        else:
            break
        if inner is None:
            break
        current = inner
    return type(current).__name__
