"""PoolWatchMiddleware's ASGI part: serves metrics and health, and tells checkouts their request.

The application's own middleware may use the database before its router runs (an API-key lookup).
Added before poolwatch's, it runs inside it: the request context is there, and its route is found by
matching the app's routes (``RequestContext.route``). Added after, it wraps poolwatch's and runs
before any of it: so the request context is set by a thin layer (``RequestScope``) put around the
app's whole middleware stack, the first time poolwatch's middleware is called with a Starlette app
in the scope (the lifespan start-up, under a server, or else the first request) and finds one of the
application's middlewares outside it. Poolwatch's endpoints stay where the application put them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextvars import ContextVar

from .._log import internal_errors, logger
from .._record.context import RequestContext, current_request
from .._record.recorder import perf_counter
from .exposition import serve_metrics
from .health import HealthEndpoints
from .http import ASGIApp, Message, Receive, Scope, Send
from .page import LivePage
from .watched import Watched

Endpoint = Callable[[Scope, Receive, Send], Awaitable[None]]


def route_path(scope: Scope) -> str:
    """The path as the app's router sees it: without the prefix of a Mount the app sits under.

    Starlette keeps the full path in ``scope["path"]`` and the mount prefix in ``root_path``
    (its own ``get_route_path``, which is private, does the same).
    """
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if not root_path or not path.startswith(root_path):
        return path
    rest = path[len(root_path) :]
    if not rest or rest.startswith("/"):
        return rest
    return path


def application_routes(scope: Scope, path: str) -> bool:
    """Whether the Starlette/FastAPI app in ``scope`` has a route of its own at ``path``.

    Only a route or Mount whose literal path is ``path`` counts (``/metrics`` served by a
    ``Route`` or ``app.mount("/metrics", make_asgi_app())``); a catch-all such as
    ``/{path:path}`` does not claim poolwatch's paths.
    """
    from starlette.routing import Match

    router = getattr(scope.get("app"), "router", None)
    routes = getattr(router, "routes", None)
    if not routes:
        return False
    wanted = path.rstrip("/")
    root_path = scope.get("root_path", "")
    for candidate in (path, wanted + "/"):
        probe = dict(scope, path=root_path + candidate)
        for route in routes:
            literal = getattr(route, "path", None)  # a Mount's own prefix, a Route's template
            if not isinstance(literal, str) or "{" in literal or literal.rstrip("/") != wanted:
                continue
            match, _ = route.matches(probe)
            if match != Match.NONE:
                return True
    return False


class Middleware:
    """The ASGI part of ``PoolWatchMiddleware``, which builds the PoolWatch (``poolwatch._wiring``)."""

    def __init__(self, app: ASGIApp, watch: Watched) -> None:
        self.app = app
        self.watch = watch
        config = watch.settings
        health = HealthEndpoints(watch)
        # Sidecar mode: these paths are served on metrics_port only; here they reach the app. A
        # path set to None is not served at all (the application exposes the registry itself).
        candidates: dict[str | None, Endpoint] = (
            {}
            if config.metrics_port is not None
            else {
                config.metrics_path: self._serve_metrics,
                config.health_db_path: health.db,
                config.health_live_path: health.live,
            }
        )
        if config.ui != "never":
            # The live page is served on the app's port even in sidecar mode: it is for a person
            # with a browser, who reaches the service, not the metrics port.
            # The page with and without a trailing slash, and its JSON.
            candidates.update(LivePage(watch).endpoints())
        self._endpoints: dict[str, Endpoint] = {
            path: endpoint for path, endpoint in candidates.items() if path is not None
        }
        # Per path: does the application have a route there itself? Decided on first use, when
        # the app (scope["app"]) and its routes are known; an application's own endpoint wins.
        self._app_owns: dict[str, bool] = {}
        self._loop_seen = False
        self._placed = False
        # Looked up once: it runs at the end of every request.
        self._request_finished = watch.requests.request_finished

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._loop_seen:
            self._note_loop()
        if not self._placed:
            self._place_request_scope(scope)
        kind = scope["type"]
        if kind == "http":
            # ``_own_endpoint``, written out: a call less on every request.
            path = route_path(scope) if scope.get("root_path") else scope["path"]
            endpoint = self._endpoints.get(path)
            if endpoint is not None:
                owned = self._app_owns.get(path)
                if owned is None:
                    owned = self._app_owns[path] = self._application_serves(scope, path)
                if not owned:
                    await endpoint(scope, receive, send)
                    return
        elif kind != "websocket":
            await self.app(scope, receive, send)
            return
        if _scoped_by.get() is self:
            # This middleware's RequestScope, outside the application's middleware, set the
            # request's context: it notes the response and counts the request.
            await self.app(scope, receive, send)
            return

        # ``attributed``, written out: one coroutine less on every request.
        context = RequestContext(scope)
        token = current_request.set(context)

        def send_and_note_response(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                context.response_started = True
                context.response_started_at = perf_counter()
                context.response_headers = message.get("headers")
            return send(message)

        try:
            await self.app(scope, receive, send_and_note_response)
        finally:
            current_request.reset(token)
            try:
                self._request_finished(context.key or context.labels(), context.queries)
            except Exception as error:
                internal_errors.record("request_finished", error)

    def _own_endpoint(self, scope: Scope) -> Endpoint | None:
        """Poolwatch's endpoint at this request's path, unless the application routes it itself."""
        path = route_path(scope) if scope.get("root_path") else scope["path"]
        endpoint = self._endpoints.get(path)
        if endpoint is None:
            return None
        owned = self._app_owns.get(path)
        if owned is None:
            owned = self._app_owns[path] = self._application_serves(scope, path)
        return None if owned else endpoint

    async def attributed(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Run ``app`` with this request's context set: checkouts, timeouts and statements inside
        it are the request's. (``__call__`` has a copy inline.)"""
        context = RequestContext(scope)
        token = current_request.set(context)

        # A plain function that returns send's awaitable: the app awaits that directly, so no
        # coroutine of ours is made for every message of every response.
        def send_and_note_response(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                context.response_started = True
                context.response_started_at = perf_counter()
                context.response_headers = message.get("headers")
            return send(message)

        try:
            await app(scope, receive, send_and_note_response)
        finally:
            current_request.reset(token)
            try:
                self._request_finished(context.key or context.labels(), context.queries)
            except Exception as error:
                internal_errors.record("request_finished", error)

    def _application_serves(self, scope: Scope, path: str) -> bool:
        """Whether the application routes ``path`` itself (its own ``/metrics``, say)."""
        try:
            owned = application_routes(scope, path)
        except Exception as error:
            internal_errors.record("route_clash", error)
            return False
        if owned:
            settings = self.watch.settings
            setting = next(
                (name for name in ("metrics_path", "health_db_path", "health_live_path")
                 if getattr(settings, name) == path),
                "ui_path"
                if path.rstrip("/") in (settings.ui_path, settings.ui_path + "/state")
                else "metrics_path",
            )  # fmt: skip
            logger.warning(
                "poolwatch.path_taken",
                path=path,
                setting=setting,
                detail=f"the application serves {path} itself, so poolwatch leaves it alone; set "
                f"{setting} (POOLWATCH_{setting.upper()}) to another path to serve poolwatch's, "
                "or to None if the application's endpoint already exposes poolwatch's registry",
            )
        return owned

    def _place_request_scope(self, scope: Scope) -> None:
        """Put a RequestScope around the Starlette app's middleware stack if one of the
        application's middlewares sits outside this one (see the module docstring)."""
        self._placed = True
        try:
            app = scope.get("app")
            stack = getattr(app, "middleware_stack", None)
            if stack is None or isinstance(stack, RequestScope) or not _outside_of(stack, self):
                return
            app.middleware_stack = RequestScope(stack, self)  # type: ignore[union-attr]
        except Exception as error:
            internal_errors.record("request_scope", error)

    def _note_loop(self) -> None:
        # The sidecar runs health endpoints on the app's loop (async engines' connections are
        # bound to it); the first lifespan or request event tells us which loop that is.
        self._loop_seen = True
        self.watch.app_loop = asyncio.get_running_loop()

    async def _serve_metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        await serve_metrics(self.watch.registry, scope, receive, send, self.watch.direct_collector)


# The middleware whose RequestScope set the current request's context, if one did.
_scoped_by: ContextVar[Middleware | None] = ContextVar("poolwatch_scoped_by", default=None)

# Frameworks whose own layers run no application code before the request goes on (Starlette's
# error and body-limit layers, FastAPI's telemetry and body-limit ones; CORS, GZip), except the
# layer that runs an ``@app.middleware("http")`` function.
_FRAMEWORKS = ("starlette", "fastapi")
_RUNS_APPLICATION_CODE = "BaseHTTPMiddleware"


def _outside_of(stack: ASGIApp, middleware: Middleware) -> bool:
    """Whether an application middleware runs before ``middleware`` in ``stack``: found by following
    each layer's ``app`` (as Starlette's middlewares keep the next one) from the top."""
    layer: object = stack
    for _ in range(64):
        if layer is middleware:
            return False
        kind = type(layer)
        if kind.__module__.partition(".")[0] not in _FRAMEWORKS or kind.__name__ == _RUNS_APPLICATION_CODE:
            return True
        layer = getattr(layer, "app", None)
        if layer is None:
            return True
    return True


class RequestScope:
    """The request context around an application's whole middleware stack, so that work done in
    the application's own middleware, outside poolwatch's, belongs to its request."""

    def __init__(self, app: ASGIApp, middleware: Middleware) -> None:
        self.app = app
        self.middleware = middleware

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        middleware = self.middleware
        if kind == "websocket" or (kind == "http" and middleware._own_endpoint(scope) is None):
            token = _scoped_by.set(middleware)
            try:
                await middleware.attributed(self.app, scope, receive, send)
            finally:
                _scoped_by.reset(token)
        else:
            await self.app(scope, receive, send)
