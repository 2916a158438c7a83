"""``/metrics``: OpenMetrics when asked, gzip when accepted.

Other collectors in the registry go through prometheus_client's encoders; poolwatch's own families
are written directly (see ``_text_writer``) when this process serves them from its recorders.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import CollectorRegistry

from ._asgi import Receive, Scope, Send, header, method_not_allowed, respond
from ._collector import PoolWatchCollector, writing_directly
from ._log import internal_errors
from ._text_writer import write

_EOF = b"# EOF\n"


@dataclass
class Rendered:
    body: bytes
    content_type: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def render(
    registry: CollectorRegistry,
    accept: str | None,
    accept_encoding: str | None,
    direct: PoolWatchCollector | None = None,
) -> Rendered:
    """The registry in the format asked for; ``direct``'s families written by poolwatch itself."""
    encoder, content_type = choose_encoder(accept or "")
    body = _encode(registry, encoder, content_type, direct)
    rendered = Rendered(body, content_type, [(b"vary", b"Accept, Accept-Encoding")])
    if gzip_accepted(accept_encoding or ""):
        # Level 1: half the CPU of the default for a body that is mostly repeated label text,
        # which compresses ~20x at any level; the scrape holds the event loop meanwhile.
        rendered.body = gzip.compress(rendered.body, compresslevel=1)
        rendered.headers.append((b"content-encoding", b"gzip"))
    return rendered


def _encode(
    registry: CollectorRegistry,
    encoder: Callable[[CollectorRegistry], bytes],
    content_type: str,
    direct: PoolWatchCollector | None,
) -> bytes:
    if direct is None:
        return encoder(registry)
    try:
        ours = write(direct.read(), openmetrics=content_type.startswith("application/openmetrics"))
    except Exception as error:
        internal_errors.record("render", error)
        return encoder(registry)  # the slow, general way still works
    token = writing_directly.set(True)  # the registry pass now skips poolwatch's collector
    try:
        rest = encoder(registry)
    finally:
        writing_directly.reset(token)
    if rest.endswith(_EOF):  # OpenMetrics ends with # EOF: ours go before it
        return rest[: -len(_EOF)] + ours + _EOF
    return rest + ours


async def serve_metrics(
    registry: CollectorRegistry,
    scope: Scope,
    receive: Receive,
    send: Send,
    direct: PoolWatchCollector | None = None,
) -> None:
    method = scope.get("method", "GET")
    if method not in ("GET", "HEAD"):
        await method_not_allowed(send)
        return
    rendered = render(registry, header(scope, b"accept"), header(scope, b"accept-encoding"), direct)
    await respond(
        send,
        200,
        rendered.body,
        rendered.content_type,
        extra_headers=rendered.headers,
        head_only=method == "HEAD",
    )
