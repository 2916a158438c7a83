"""The request a checkout belongs to, carried in a ContextVar set by the ASGI middleware.

A ContextVar follows the request into sync endpoints (Starlette copies the context into the
threadpool), into SQLAlchemy's greenlet for async engines, into dependencies with ``yield`` and into
background tasks, so one lookup at checkout time is all attribution costs on the hot path.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import Any

from .._log import internal_errors

NO_REQUEST = "<none>"
UNMATCHED = "<unmatched>"
# The route label of the /health/db probe's own checkouts (and the server limit read's).
PROBE_ROUTE = "<probe>"
# (route, method) of work outside any request.
NO_REQUEST_KEY = (NO_REQUEST, NO_REQUEST)

# The method label: HTTP's registered methods, and WEBSOCKET for a websocket session (its scope has
# no method); anything else a client sends is OTHER, so a client cannot grow the number of series
# by inventing methods.
METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "WEBSOCKET")
)


class RequestContext:
    """One HTTP request. The route is resolved lazily: routing happens after the middleware runs."""

    __slots__ = (
        "early_route",
        "key",
        "method",
        "queries",
        "resolved_route",
        "response_headers",
        "response_started",
        "response_started_at",
        "scope",
    )

    def __init__(self, scope: MutableMapping[str, Any]) -> None:
        self.scope = scope
        # The route the app's routes match, asked for before the router chose one.
        self.early_route: str | None = None
        self.queries = 0
        method = "WEBSOCKET" if scope.get("type") == "websocket" else scope.get("method")
        # Anything but a registered method is OTHER: clients cannot add series.
        self.method = method if method.__class__ is str and method in METHODS else "OTHER"
        # Set once the app has begun its response: work after that outlives the request. When it
        # began (perf_counter) and its headers, which say what kind of body follows (a stream, SSE,
        # a file): read only for a checkout that outlives the start (``response_kind``).
        self.response_started = False
        self.response_started_at = 0.0
        self.response_headers: Any = None
        # The template once known; read directly on the hot path to skip the property call.
        self.resolved_route: str | None = None
        # (route, method) once the route is known: the key of the per-route histograms, made once.
        self.key: tuple[str, str] | None = None

    def labels(self) -> tuple[str, str]:
        """(route, method); kept in ``key`` once routing is done."""
        route = self.route
        if self.resolved_route is None:
            return (route, self.method)
        key = self.key = (route, self.method)
        return key

    @property
    def route(self) -> str:
        """The route template, or ``<unmatched>``; stable once routing is done.

        Asked before routing (work in the application's own middleware: an API-key lookup), it is
        the route the app's routes match for this request, as the router will choose it; asked
        after, the router's own choice.
        """
        if self.resolved_route is not None:
            return self.resolved_route
        route = self.scope.get("route") or route_of_endpoint(self.scope)
        if route is None:
            early = self.early_route
            if early is None:
                early = self.early_route = route_by_matching(self.scope) or UNMATCHED
            return early
        template = route_template(route, self.scope)
        self.resolved_route = template
        return template


def response_kind(context: RequestContext) -> str:
    """``sse``, ``file``, ``streaming`` (a body without a Content-Length, sent in pieces) or
    ``plain``, from the response's start message."""
    headers = context.response_headers
    sized = False
    try:
        for name, value in headers or ():
            name = bytes(name).lower()
            if name == b"content-type" and bytes(value).lower().startswith(b"text/event-stream"):
                return "sse"
            if name == b"content-disposition" or name == b"accept-ranges":
                return "file"
            if name == b"content-length":
                sized = True
    except (TypeError, ValueError):  # headers that are not ASGI's (bytes, bytes) pairs
        return "plain"
    return "plain" if sized else "streaming"


current_request: ContextVar[RequestContext | None] = ContextVar("poolwatch_request", default=None)


def route_label(context: RequestContext | None) -> str:
    return NO_REQUEST if context is None else context.route


# The values of Starlette's Match enum: this module imports no web framework.
_FULL, _PARTIAL = 2, 1


def route_by_matching(scope: MutableMapping[str, Any]) -> str | None:
    """The template of the route the app in ``scope`` would route this request to, found by asking
    its routes (``route.matches(scope)``, as Starlette's router does: the first full match, else
    the first partial one) before its router has run; None if none matches.

    Matching runs on a copy of the scope, since FastAPI's routes write into it. It costs about what
    the router's own matching costs, once per request, and only for a request whose route is asked
    for before routing (or that no route matched).
    """
    router = scope.get("router") or getattr(scope.get("app"), "router", None)
    routes = getattr(router, "routes", None)
    if not routes:
        return None
    probe = dict(scope)
    fastapi_scope = probe.get("fastapi")
    if isinstance(fastapi_scope, dict):
        probe["fastapi"] = dict(fastapi_scope)
    try:
        return _match(routes, probe, "", 0)
    except Exception as error:  # a route whose matches() fails on a scope it was not meant for
        internal_errors.record("route_match", error)
        return None


def _match(routes: Any, scope: MutableMapping[str, Any], prefix: str, depth: int) -> str | None:
    if depth > 16:  # a pathological or cyclic mount tree
        return None
    partial = None
    for route in routes:
        matches = getattr(route, "matches", None)
        if matches is None:
            continue
        match, child = matches(scope)
        match = getattr(match, "value", match)
        if match == _FULL:
            return _matched_template(route, scope, child, prefix, depth)
        if match == _PARTIAL and partial is None:
            partial = (route, child)
    if partial is not None:
        return _matched_template(partial[0], scope, partial[1], prefix, depth)
    return None


def _matched_template(
    route: Any, scope: MutableMapping[str, Any], child: Any, prefix: str, depth: int
) -> str | None:
    select = getattr(route, "_match", None)
    if getattr(route, "include_context", None) is not None and callable(select):
        # FastAPI's lazily included router: which of its routes, and the template with the
        # prefix given at inclusion (the same context ``_fastapi_effective_path`` reads later).
        _, child, inner, effective = select(scope)
        if effective is not None:
            starlette_route = getattr(effective, "starlette_route", None)
            path = getattr(starlette_route, "path_format", None) or getattr(effective, "path_format", None)
            return prefix + path if isinstance(path, str) else None
        return None if inner is None else _matched_template(inner, scope, child, prefix, depth + 1)
    children, is_mount = _children(route)
    if children and is_mount:
        merged = dict(scope)
        merged.update(child)
        return _match(children, merged, prefix + (getattr(route, "path", "") or ""), depth + 1)
    path = getattr(route, "path_format", None)
    return prefix + path if isinstance(path, str) else None


# id(route) -> (route, mount prefix). Keeping the route object alive makes the id safe to reuse.
_mount_prefixes: dict[int, tuple[Any, str]] = {}


def route_template(route: Any, scope: MutableMapping[str, Any]) -> str:
    """``/users/{user_id}`` for a route, with the templates of any Mounts it sits under."""
    path = _fastapi_effective_path(route, scope) or getattr(route, "path_format", None)
    if not isinstance(path, str):
        return UNMATCHED
    # Only a mounted sub-app changes root_path; everything else already has its full template.
    if scope.get("root_path", "") == scope.get("app_root_path", scope.get("root_path", "")):
        return path
    cached = _mount_prefixes.get(id(route))
    if cached is None or cached[0] is not route:
        router = scope.get("router")
        prefix = _find_mount_prefix(getattr(router, "routes", ()), route, depth=0)
        cached = (route, prefix if prefix is not None else "")
        _mount_prefixes[id(route)] = cached
    return cached[1] + path


# id(endpoint) -> (endpoint, route): keeping the endpoint alive makes the id safe to reuse.
_endpoint_routes: dict[int, tuple[Any, Any]] = {}


def route_of_endpoint(scope: MutableMapping[str, Any]) -> Any:
    """The route that matched, found from the endpoint the router put in the scope.

    FastAPI's router marks ``scope["route"]`` for its own API routes only; a plain Starlette
    ``Route`` (``/docs``, ``/openapi.json``) or a ``Mount`` of a raw ASGI app (GraphQL) leaves just
    ``scope["endpoint"]``: the route or Mount whose endpoint (or mounted app) that is.
    """
    endpoint = scope.get("endpoint")
    if endpoint is None:
        return None
    cached = _endpoint_routes.get(id(endpoint))
    if cached is not None and cached[0] is endpoint:
        return cached[1]
    router = scope.get("router") or getattr(scope.get("app"), "router", None)
    found = _find_endpoint(getattr(router, "routes", ()), endpoint, depth=0)
    if found is not None:
        _endpoint_routes[id(endpoint)] = (endpoint, found)
    return found


def _find_endpoint(routes: Any, endpoint: Any, depth: int) -> Any:
    if depth > 16:
        return None
    for candidate in routes:
        if getattr(candidate, "endpoint", None) is endpoint or getattr(candidate, "app", None) is endpoint:
            return candidate
        children, _ = _children(candidate)
        if children:
            found = _find_endpoint(children, endpoint, depth + 1)
            if found is not None:
                return found
    return None


def _fastapi_effective_path(route: Any, scope: MutableMapping[str, Any]) -> str | None:
    """The template FastAPI resolved for ``route``, prefixes of included routers included.

    FastAPI 0.12x+ keeps ``include_router(router, prefix=...)`` lazy: ``scope["route"]`` is the
    router's own APIRoute, whose ``path_format`` lacks the prefix; the prefixed template lives in
    the effective route context FastAPI stores in the scope (as its own telemetry reads it).
    """
    fastapi_scope = scope.get("fastapi")
    if not isinstance(fastapi_scope, dict):
        return None
    context = fastapi_scope.get("effective_route_context")
    if context is None or getattr(context, "original_route", None) is not route:
        return None
    path = getattr(getattr(context, "starlette_route", None), "path_format", None)
    path = path or getattr(context, "path_format", None)
    return path if isinstance(path, str) and path else None


def _children(route: Any) -> tuple[Any, bool]:
    """A route's sub-routes, and whether its own path is a prefix of theirs (a Mount's is)."""
    included = getattr(route, "include_context", None)
    if included is not None:  # FastAPI's lazily included router: prefix already in the template
        return getattr(getattr(included, "included_router", None), "routes", ()), False
    children = getattr(route, "routes", None)
    return (children or ()), hasattr(route, "path_regex")


def _find_mount_prefix(routes: Any, target: Any, depth: int) -> str | None:
    if depth > 16:  # a pathological or cyclic mount tree; give up rather than recurse forever
        return None
    for candidate in routes:
        if candidate is target:
            return ""
        children, is_prefix = _children(candidate)
        if not children:
            continue
        found = _find_mount_prefix(children, target, depth + 1)
        if found is not None:
            own = getattr(candidate, "path", "") if is_prefix else ""
            return (own or "") + found
    return None
