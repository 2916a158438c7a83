"""SQLAlchemy pool event listeners, and the hook that follows ``engine.dispose()`` to the new pool.

Only PoolEvents are used: registered on the engine they travel with the pool through
``engine.dispose()`` (SQLAlchemy hands the dispatch to the recreated pool), and unlike
ConnectionEvents they leave the statement path untouched (see ``_dialect_hooks``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event

from ._log import internal_errors, swallowing
from ._pool_hooks import hook_pool

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from ._recorder import PoolRecorder

_DISPOSE_MARK = "_poolwatch_dispose"


class EngineListeners:
    """What poolwatch attaches to one engine besides the pool hooks, kept to be taken off again."""

    def __init__(self, recorder: PoolRecorder) -> None:
        self.recorder = recorder
        self._registered: list[tuple[str, Callable[..., Any]]] = []

    def install(self, engine: Engine) -> None:
        recorder = self.recorder

        @swallowing("invalidate")
        def on_invalidate(dbapi_connection: Any, record: Any, exception: Any) -> None:
            recorder.invalidated("explicit" if exception is None else type(exception).__name__)

        @swallowing("soft_invalidate")
        def on_soft_invalidate(dbapi_connection: Any, record: Any, exception: Any) -> None:
            recorder.invalidated("soft")

        for name, function in (("invalidate", on_invalidate), ("soft_invalidate", on_soft_invalidate)):
            event.listen(engine, name, function)
            self._registered.append((name, function))
        _follow_dispose(engine, recorder)

    def remove(self, engine: Engine) -> None:
        for name, function in self._registered:
            if event.contains(engine, name, function):
                event.remove(engine, name, function)
        self._registered.clear()
        engine.__dict__.pop("dispose", None)
        engine.__dict__.pop(_DISPOSE_MARK, None)


def _follow_dispose(engine: Engine, recorder: PoolRecorder) -> None:
    """Hook the pool that ``engine.dispose()`` creates.

    The ``engine_disposed`` event would do it, but it is a ConnectionEvents listener and so would
    slow every statement (see ``_dialect_hooks``). AsyncEngine.dispose calls this same method.
    """
    if engine.__dict__.get(_DISPOSE_MARK) is recorder:
        return
    original_dispose = type(engine).dispose

    def dispose(close: bool = True) -> None:
        original_dispose(engine, close)
        try:
            hook_pool(engine.pool, recorder)
        except Exception as error:
            internal_errors.record("dispose", error)

    engine.__dict__["dispose"] = dispose
    engine.__dict__[_DISPOSE_MARK] = recorder
