"""Answers rendered once, served to ASGI through Starlette's own responses and to WSGI (the sidecar).

``/metrics`` and the health endpoints each render a :class:`Rendered` from plain inputs (the method
and a header or two), the way prometheus_client's ``_bake_output`` feeds both of its servers; the two
adapters below only format it. The ASGI vocabulary is Starlette's (``starlette.types``), re-exported
here so the serving room names it in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "ASGIApp",
    "Message",
    "Receive",
    "Rendered",
    "Scope",
    "Send",
    "asgi_response",
    "header",
    "json_rendered",
    "method_not_allowed",
    "wsgi_answer",
]

# Longer header values are treated as malformed rather than parsed.
MAX_HEADER_BYTES = 8192
READ_METHODS = ("GET", "HEAD")

StartResponse = Callable[..., Any]


@dataclass
class Rendered:
    """One answer: its status, body, content type and any further headers."""

    body: bytes
    content_type: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    status: int = 200


def header(scope: Scope, name: str) -> str | None:
    """The first value of a request header, or None when absent or oversized."""
    return _bounded(Headers(scope=scope).get(name))


def environ_header(environ: dict[str, Any], name: str) -> str | None:
    """The same for a WSGI request (``HTTP_AUTHORIZATION`` for ``authorization``)."""
    value = environ.get("HTTP_" + name.upper().replace("-", "_"))
    return _bounded(value if isinstance(value, str) else None)


def _bounded(value: str | None) -> str | None:
    return None if value is None or len(value) > MAX_HEADER_BYTES else value


def json_rendered(status: int, payload: Any, headers: Iterable[tuple[bytes, bytes]] = ()) -> Rendered:
    """``payload`` as compact JSON, the way Starlette's JSONResponse writes it."""
    body = bytes(JSONResponse(payload).body)
    return Rendered(body, "application/json", list(headers), status)


def method_not_allowed(allowed: str = "GET, HEAD") -> Rendered:
    return json_rendered(405, {"detail": "Method Not Allowed"}, [(b"allow", allowed.encode("latin-1"))])


def asgi_response(rendered: Rendered, method: str) -> Response:
    """A Starlette Response for ``rendered``; to HEAD, the same headers and no body."""
    headers = {"cache-control": "no-store"}
    headers.update((key.decode("latin-1"), value.decode("latin-1")) for key, value in rendered.headers)
    response = Response(rendered.body, rendered.status, headers, media_type=rendered.content_type)
    if method == "HEAD":
        # Content-Length was set from the body above: it still says what a GET would get.
        response.body = b""
    return response


def wsgi_answer(rendered: Rendered, method: str, start_response: StartResponse) -> list[bytes]:
    """Serve ``rendered`` to a WSGI server with exactly the headers the ASGI answer has."""
    response = asgi_response(rendered, method)
    status = f"{response.status_code} {HTTPStatus(response.status_code).phrase}"
    start_response(status, [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers])
    return [bytes(response.body)]
