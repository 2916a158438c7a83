"""poolwatch: see a SQLAlchemy connection pool from a FastAPI (or any ASGI) service.

app.add_middleware(PoolWatchMiddleware, engines=[engine])
# or
poolwatch.instrument(app, engine)

In tests: the ``poolwatch_guard`` fixture and ``@pytest.mark.max_queries(n)`` (the pytest plugin),
``with poolwatch.assert_max_queries(n):`` and ``with poolwatch.assert_queries(n):``.

The public names are loaded on first use, so that importing one submodule (``poolwatch.gunicorn``
in gunicorn's master process) loads nothing else of poolwatch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._guard import PoolGuard, assert_max_queries, assert_queries
    from ._otel import otel_bridge
    from ._settings import PoolWatchSettings
    from ._wiring import PoolWatch, PoolWatchMiddleware, instrument, watch

__all__ = [
    "PoolGuard",
    "PoolWatch",
    "PoolWatchMiddleware",
    "PoolWatchSettings",
    "assert_max_queries",
    "assert_queries",
    "instrument",
    "otel_bridge",
    "watch",
]
__version__ = "0.2.0"

# Where each public name lives.
_HOMES = {
    "PoolGuard": "._guard",
    "PoolWatch": "._wiring",
    "PoolWatchMiddleware": "._wiring",
    "PoolWatchSettings": "._settings",
    "assert_max_queries": "._guard",
    "assert_queries": "._guard",
    "instrument": "._wiring",
    "otel_bridge": "._otel",
    "watch": "._wiring",
}

if not TYPE_CHECKING:  # hidden from type checkers, which would take any misspelt name for Any

    def __getattr__(name: str) -> Any:
        home = _HOMES.get(name)
        if home is None:
            raise AttributeError(f"module 'poolwatch' has no attribute {name!r}")
        value = getattr(importlib.import_module(home, __name__), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
