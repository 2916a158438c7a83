"""Small helpers for answering an ASGI HTTP request directly."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Longer header values are treated as malformed rather than parsed.
MAX_HEADER_BYTES = 8192


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header, or None when absent or oversized."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            if len(value) > MAX_HEADER_BYTES:
                return None
            return str(value.decode("latin-1"))
    return None


async def respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    *,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    head_only: bool = False,
) -> None:
    headers = [
        (b"content-type", content_type.encode("latin-1")),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"cache-control", b"no-store"),
        *(extra_headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head_only else body})


async def respond_json(
    send: Send,
    status: int,
    payload: Any,
    *,
    head_only: bool = False,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    await respond(
        send, status, body, "application/json", head_only=head_only, extra_headers=extra_headers
    )


async def method_not_allowed(send: Send, allowed: str = "GET, HEAD") -> None:
    await respond_json(
        send, 405, {"detail": "Method Not Allowed"}, extra_headers=[(b"allow", allowed.encode())]
    )
