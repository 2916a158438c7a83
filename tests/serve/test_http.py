"""One answer, two servers: what /metrics and health render is served the same over ASGI and WSGI.

No database: health runs over a real QueuePool of fake DBAPI connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from starlette.types import Receive, Scope, Send

import poolwatch
from poolwatch._serve.health import HealthEndpoints
from poolwatch._serve.http import (
    MAX_HEADER_BYTES,
    Rendered,
    asgi_response,
    environ_header,
    header,
    json_rendered,
    wsgi_answer,
)
from tests.fake_dbapi import engine_for_test


def _over_asgi(rendered: Rendered, method: str) -> httpx.Response:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await asgi_response(rendered, scope["method"])(scope, receive, send)

    async def fetch() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.request(method, "/")

    return asyncio.run(fetch())


def _over_wsgi(rendered: Rendered, method: str) -> httpx.Response:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        return wsgi_answer(rendered, environ["REQUEST_METHOD"], start_response)

    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as client:
        return client.request(method, "/")


def test_asgi_and_wsgi_serve_one_rendering_alike() -> None:
    rendered = Rendered(b"payload\n", "text/plain; version=0.0.4; charset=utf-8", [(b"vary", b"Accept")], 200)
    for method in ("GET", "HEAD"):
        asgi, wsgi = _over_asgi(rendered, method), _over_wsgi(rendered, method)
        assert asgi.status_code == wsgi.status_code == 200
        assert sorted(asgi.headers.items()) == sorted(wsgi.headers.items())
        assert asgi.headers["content-length"] == "8"  # for HEAD too: what a GET would get
        assert asgi.headers["cache-control"] == "no-store"
        assert asgi.headers["vary"] == "Accept"
        assert asgi.content == wsgi.content == (b"payload\n" if method == "GET" else b"")


def test_json_answers_and_their_status_line() -> None:
    rendered = json_rendered(503, {"status": "down"})
    asgi, wsgi = _over_asgi(rendered, "GET"), _over_wsgi(rendered, "GET")
    assert asgi.status_code == wsgi.status_code == 503
    assert wsgi.reason_phrase == "Service Unavailable"
    assert asgi.json() == wsgi.json() == {"status": "down"}
    assert asgi.headers["content-type"] == "application/json"


def test_oversized_headers_are_treated_as_absent() -> None:
    fine, huge = "Bearer x", "Bearer " + "x" * MAX_HEADER_BYTES
    at_bound, past_it = "x" * MAX_HEADER_BYTES, "x" * (MAX_HEADER_BYTES + 1)
    for value, expected in ((fine, fine), (huge, None), (at_bound, at_bound), (past_it, None)):
        scope: Scope = {"type": "http", "headers": [(b"authorization", value.encode())]}
        assert header(scope, "authorization") == expected
        assert environ_header({"HTTP_AUTHORIZATION": value}, "authorization") == expected


def test_health_renders_from_the_method_and_the_authorization_header_alone() -> None:
    with engine_for_test() as (engine, _):
        watch = poolwatch.watch(
            engine,
            registry=CollectorRegistry(),
            name="fake",
            health_details="token",
            health_token="s3cret",
            health_cache_seconds=0,
        )
        health = HealthEndpoints(watch)
        try:
            plain = asyncio.run(health.answer_db("GET", None))
            detailed = asyncio.run(health.answer_db("GET", "Bearer s3cret"))
            wrong = asyncio.run(health.answer_db("GET", "Bearer guess"))
            refused = asyncio.run(health.answer_db("POST", "Bearer s3cret"))
            live = asyncio.run(health.answer_live("HEAD"))
        finally:
            watch.close()
    assert (plain.status, plain.body) == (200, b'{"status":"ok"}')
    assert wrong.body == plain.body
    assert detailed.status == 200 and b'"pools":{"fake":{"status":"ok"' in detailed.body
    assert refused.status == 405 and (b"allow", b"GET, HEAD") in refused.headers
    assert (live.status, live.body) == (200, b'{"status":"ok"}')
