"""poolwatch: see a SQLAlchemy connection pool from a FastAPI (or any ASGI) service.

app.add_middleware(PoolWatchMiddleware, engines=[engine])
# or
poolwatch.instrument(app, engine)
"""

from __future__ import annotations

from typing import Any

from prometheus_client.registry import CollectorRegistry

from ._core import PoolWatch, watch
from ._middleware import PoolWatchMiddleware
from ._otel import otel_bridge
from ._settings import PoolWatchSettings

__all__ = [
    "PoolWatch",
    "PoolWatchMiddleware",
    "PoolWatchSettings",
    "instrument",
    "otel_bridge",
    "watch",
]
__version__ = "0.1.0"


def instrument(
    app: Any,
    *engines: Any,
    registry: CollectorRegistry | None = None,
    name: str | None = None,
    **settings: Any,
) -> PoolWatch:
    """Watch ``engines`` and add :class:`PoolWatchMiddleware` to a Starlette or FastAPI ``app``."""
    add_middleware = getattr(app, "add_middleware", None)
    if not callable(add_middleware):
        raise TypeError(
            "poolwatch: instrument() needs a Starlette or FastAPI app; for another ASGI app "
            "wrap it yourself: PoolWatchMiddleware(app, watch=poolwatch.watch(engine))"
        )
    pool_watch = PoolWatch(engines, registry=registry, name=name, **settings)
    add_middleware(PoolWatchMiddleware, watch=pool_watch)
    return pool_watch
