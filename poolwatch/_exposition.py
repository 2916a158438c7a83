"""``/metrics``: prometheus_client's own encoders, OpenMetrics when asked, gzip when accepted."""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field

from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import CollectorRegistry

from ._asgi import Receive, Scope, Send, header, method_not_allowed, respond


@dataclass
class Rendered:
    body: bytes
    content_type: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def render(
    registry: CollectorRegistry, accept: str | None, accept_encoding: str | None
) -> Rendered:
    encoder, content_type = choose_encoder(accept or "")
    rendered = Rendered(encoder(registry), content_type, [(b"vary", b"Accept, Accept-Encoding")])
    if gzip_accepted(accept_encoding or ""):
        rendered.body = gzip.compress(rendered.body, compresslevel=6)
        rendered.headers.append((b"content-encoding", b"gzip"))
    return rendered


async def serve_metrics(
    registry: CollectorRegistry, scope: Scope, receive: Receive, send: Send
) -> None:
    method = scope.get("method", "GET")
    if method not in ("GET", "HEAD"):
        await method_not_allowed(send)
        return
    rendered = render(registry, header(scope, b"accept"), header(scope, b"accept-encoding"))
    await respond(
        send,
        200,
        rendered.body,
        rendered.content_type,
        extra_headers=rendered.headers,
        head_only=method == "HEAD",
    )
