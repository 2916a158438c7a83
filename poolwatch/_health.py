"""Health endpoints (placeholder until issue 4): /health/live and a minimal /health/db."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._asgi import Receive, Scope, Send, method_not_allowed, respond_json

if TYPE_CHECKING:
    from ._core import PoolWatch


class HealthEndpoints:
    def __init__(self, watch: PoolWatch) -> None:
        self.watch = watch

    async def live(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await method_not_allowed(send)
            return
        await respond_json(send, 200, {"status": "ok"}, head_only=method == "HEAD")

    async def db(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.live(scope, receive, send)
