"""What serving needs from a PoolWatch, as a Protocol.

The middleware, health, the sidecar and the OpenTelemetry bridge read a PoolWatch; the wiring module
(``poolwatch._wiring``) builds one and, for the sidecar and the middleware, hands it to them. Typing
against this Protocol instead of importing ``PoolWatch`` keeps that one-way: serving never imports
the module that wires it (SQLAlchemy's ``pool/base.py`` types against ``engine/interfaces.py`` the
same way).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import asyncio

    from prometheus_client.registry import CollectorRegistry

    from .._record.recorder import PoolRecorder
    from .._record.requests import RequestStats
    from .._settings import PoolWatchSettings
    from .collector import PoolWatchCollector


class Watched(Protocol):
    """A PoolWatch as serving sees it."""

    # The ASGI app's event loop, noted by the middleware: the sidecar runs health there.
    app_loop: asyncio.AbstractEventLoop | None

    @property
    def settings(self) -> PoolWatchSettings: ...

    @property
    def registry(self) -> CollectorRegistry: ...

    @property
    def recorders(self) -> list[PoolRecorder]: ...

    @property
    def requests(self) -> RequestStats: ...

    @property
    def direct_collector(self) -> PoolWatchCollector | None:
        """The collector whose families poolwatch writes itself, if not in multi-worker mode."""
        ...

    @property
    def pool_names(self) -> list[str]: ...
