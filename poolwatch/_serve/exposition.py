"""``/metrics``: OpenMetrics when asked, gzip when accepted.

Other collectors in the registry go through prometheus_client's encoders; poolwatch's own families
are written directly (see ``text_writer``) when this process serves them from its recorders.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable

from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import CollectorRegistry

from .._log import internal_errors
from .collector import PoolWatchCollector, writing_directly
from .http import READ_METHODS, Receive, Rendered, Scope, Send, asgi_response, header, method_not_allowed
from .text_writer import write

_EOF = b"# EOF\n"


def _stdlib_gzip(data: bytes) -> bytes:
    # Level 1: half the CPU of the default for a body that is mostly repeated label text,
    # which compresses ~20x at any level; the scrape holds the event loop meanwhile.
    return gzip.compress(data, compresslevel=1)


def _isal_gzip(data: bytes) -> bytes:
    # Intel ISA-L's deflate, level 1: about 6x faster than zlib's level 1 on an exposition, and a
    # smaller body (benchmarks/render.py). The same gzip format: any client reads it.
    return isal_compress(data, compresslevel=1)  # type: ignore[no-any-return,unused-ignore]


try:  # the ``speedups`` extra
    from isal.igzip import compress as isal_compress  # type: ignore[import-not-found,unused-ignore]
except Exception:  # pragma: no cover - not installed (ImportError), or a broken binary wheel
    compress_body: Callable[[bytes], bytes] = _stdlib_gzip
else:
    compress_body = _isal_gzip


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
        rendered.body = compress_body(rendered.body)
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
        return b"".join([rest[: -len(_EOF)], *ours, _EOF])
    return b"".join([rest, *ours])


def answer_metrics(
    registry: CollectorRegistry,
    method: str,
    accept: str | None,
    accept_encoding: str | None,
    direct: PoolWatchCollector | None = None,
) -> Rendered:
    """What ``/metrics`` answers to ``method``, for the ASGI and the WSGI (sidecar) adapter alike."""
    if method not in READ_METHODS:
        return method_not_allowed()
    return render(registry, accept, accept_encoding, direct)


async def serve_metrics(
    registry: CollectorRegistry,
    scope: Scope,
    receive: Receive,
    send: Send,
    direct: PoolWatchCollector | None = None,
) -> None:
    method = scope.get("method", "GET")
    rendered = answer_metrics(
        registry, method, header(scope, "accept"), header(scope, "accept-encoding"), direct
    )
    await asgi_response(rendered, method)(scope, receive, send)
