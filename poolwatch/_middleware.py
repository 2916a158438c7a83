"""PoolWatchMiddleware: pure ASGI. Serves metrics and health, and tells checkouts their request."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client.registry import CollectorRegistry

from ._asgi import ASGIApp, Message, Receive, Scope, Send
from ._context import RequestContext, current_request
from ._core import PoolWatch
from ._exposition import serve_metrics
from ._health import HealthEndpoints
from ._log import internal_errors


class PoolWatchMiddleware:
    """``app.add_middleware(PoolWatchMiddleware, engines=[engine])``; settings as keywords."""

    def __init__(
        self,
        app: ASGIApp,
        engines: Any = None,
        *,
        watch: PoolWatch | None = None,
        registry: CollectorRegistry | None = None,
        name: str | None = None,
        **settings: Any,
    ) -> None:
        if watch is None:
            if engines is None:
                raise TypeError("poolwatch: PoolWatchMiddleware needs engines=[...] or watch=")
            watch = PoolWatch([engines], registry=registry, name=name, **settings)
        elif engines is not None or settings:
            raise TypeError("poolwatch: pass either watch= or engines= with settings, not both")
        self.app = app
        self.watch = watch
        config = watch.settings
        health = HealthEndpoints(watch)
        # Sidecar mode: these paths are served on metrics_port only; here they reach the app.
        self._endpoints = (
            {}
            if config.metrics_port is not None
            else {
                config.metrics_path: self._serve_metrics,
                config.health_db_path: health.db,
                config.health_live_path: health.live,
            }
        )
        self._loop_seen = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._loop_seen:
            self._note_loop()
        kind = scope["type"]
        if kind == "http":
            endpoint = self._endpoints.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        elif kind != "websocket":
            await self.app(scope, receive, send)
            return

        context = RequestContext(scope)
        token = current_request.set(context)

        async def send_and_note_response(message: Message) -> None:
            if message["type"] == "http.response.start":
                context.response_started = True
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_response)
        finally:
            current_request.reset(token)
            try:
                self.watch.requests.request_finished(context.route, context.queries)
            except Exception as error:
                internal_errors.record("request_finished", error)

    def _note_loop(self) -> None:
        # The sidecar runs health endpoints on the app's loop (async engines' connections are
        # bound to it); the first lifespan or request event tells us which loop that is.
        self._loop_seen = True
        self.watch.app_loop = asyncio.get_running_loop()

    async def _serve_metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        await serve_metrics(self.watch.registry, scope, receive, send, self.watch.direct_collector)
