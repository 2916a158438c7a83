"""SQLAlchemy event listeners: the facts that do have events, registered on the engine.

Registering on the engine (``sync_engine`` for an AsyncEngine) rather than on the pool keeps them
through ``engine.dispose()``. Each listener swallows and counts its own failures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event

from ._context import current_request, route_label
from ._log import logger, swallowing
from ._pool_hooks import hook_pool
from ._recorder import perf_counter
from ._sql import fingerprint, operation_of

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from ._recorder import PoolRecorder

_STARTED = "_poolwatch_started"


class EngineListeners:
    """The listeners poolwatch puts on one engine, kept so they can be taken off again."""

    def __init__(self, recorder: PoolRecorder, slow_query_seconds: float) -> None:
        self.recorder = recorder
        self.slow_query_seconds = slow_query_seconds
        self._registered: list[tuple[str, Callable[..., Any]]] = []

    def install(self, engine: Engine) -> None:
        recorder = self.recorder
        slow = self.slow_query_seconds

        @swallowing("engine_disposed")
        def on_engine_disposed(engine: Engine) -> None:
            hook_pool(engine.pool, recorder)

        @swallowing("invalidate")
        def on_invalidate(dbapi_connection: Any, record: Any, exception: Any) -> None:
            recorder.invalidated("explicit" if exception is None else type(exception).__name__)

        @swallowing("soft_invalidate")
        def on_soft_invalidate(dbapi_connection: Any, record: Any, exception: Any) -> None:
            recorder.invalidated("soft")

        @swallowing("handle_error")
        def on_handle_error(context: Any) -> None:
            error = type(context.original_exception).__name__
            if context.is_pre_ping:
                recorder.pre_ping_failed(error)
                return
            statement = context.statement
            if statement is not None:
                recorder.query_failed(operation_of(statement), error)

        @swallowing("before_cursor_execute")
        def before_cursor_execute(
            conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
        ) -> None:
            request = current_request.get()
            if request is not None:
                request.queries += 1
            if context is not None:
                setattr(context, _STARTED, perf_counter())

        @swallowing("after_cursor_execute")
        def after_cursor_execute(
            conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
        ) -> None:
            started = getattr(context, _STARTED, None)
            if started is None:
                return
            elapsed = perf_counter() - started
            operation = operation_of(statement)
            recorder.query_finished(operation, elapsed)
            if slow and elapsed >= slow:
                logger.warning(
                    "poolwatch.slow_query",
                    pool=recorder.name,
                    route=route_label(current_request.get()),
                    operation=operation,
                    seconds=round(elapsed, 4),
                    threshold_seconds=slow,
                    fingerprint=fingerprint(statement),
                )

        for name, function in (
            ("engine_disposed", on_engine_disposed),
            ("invalidate", on_invalidate),
            ("soft_invalidate", on_soft_invalidate),
            ("handle_error", on_handle_error),
            ("before_cursor_execute", before_cursor_execute),
            ("after_cursor_execute", after_cursor_execute),
        ):
            event.listen(engine, name, function)
            self._registered.append((name, function))

    def remove(self, engine: Engine) -> None:
        for name, function in self._registered:
            if event.contains(engine, name, function):
                event.remove(engine, name, function)
        self._registered.clear()
