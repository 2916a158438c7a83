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

from .._log import swallowing
from .driver_errors import driver_error_class
from .pool_hooks import watched_by

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from .._record.recorder import PoolRecorder


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
                reason = "explicit" if exception is None else driver_error_class(exception)
                recorder.invalidated(recorder.invalidation_reason_for(dbapi_connection, reason))

        @swallowing("soft_invalidate")
        def on_soft_invalidate(dbapi_connection: Any, record: Any, exception: Any) -> None:
            if watched_by(record, recorder):
                recorder.invalidated("soft")

        @swallowing("connect")
        def on_connect(dbapi_connection: Any, record: Any) -> None:
            if not watched_by(record, recorder):
                return
            # A new DBAPI connection in this record: it has served no checkout yet (the checkout
            # hook counts them, for the live page's ``uses``).
            record._poolwatch_uses = 0
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
