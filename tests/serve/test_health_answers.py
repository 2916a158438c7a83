"""/health/live and /health/db over ASGI in process, compared whole: the body, the headers, HEAD
without a body, and the refusal of other methods.

tests/test_health.py serves them through uvicorn, which drops a HEAD answer's body itself; here
the application's own answer is read, as a server that does not (or the sidecar's WSGI server)
passes it on.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

import poolwatch
from tests.ports import free_port


@pytest.fixture
def engine(sync_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sync_url, pool_size=2)
    yield engine
    engine.dispose()


@pytest.fixture
def app(engine: sa.Engine, registry: CollectorRegistry) -> FastAPI:
    app = FastAPI()
    poolwatch.instrument(app, engine, registry=registry, name="main")
    return app


async def _ask(app: FastAPI, method: str, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        return await client.request(method, path)


@pytest.mark.parametrize("path", ["/health/live", "/health/db"])
async def test_get_is_compact_json_that_is_never_cached(app: FastAPI, path: str) -> None:
    answer = await _ask(app, "GET", path)
    assert answer.status_code == 200
    assert answer.content == b'{"status":"ok"}'
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["content-length"] == "15"


async def _raw(app: FastAPI, method: str, path: str) -> tuple[dict[bytes, bytes], bytes]:
    """The messages the application itself sends (httpx drops a HEAD answer's body on its own)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"host", b"app")], "client": ("127.0.0.1", 1), "server": ("app", 80),
    }  # fmt: skip
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    assert start["type"] == "http.response.start" and start["status"] == 200
    headers = dict(start["headers"])
    body = b"".join(bytes(m.get("body", b"")) for m in sent[1:])
    return headers, body


@pytest.mark.parametrize("path", ["/health/live", "/health/db"])
async def test_head_has_the_same_headers_and_no_body(app: FastAPI, path: str) -> None:
    headers, body = await _raw(app, "HEAD", path)
    assert body == b""
    # Content-Length still says what a GET would get.
    assert headers[b"content-length"] == b"15"
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"cache-control"] == b"no-store"
    assert (await _raw(app, "GET", path))[1] == b'{"status":"ok"}'


@pytest.mark.parametrize("path", ["/health/live", "/health/db"])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_other_methods_are_refused_naming_the_allowed_ones(
    app: FastAPI, path: str, method: str
) -> None:
    answer = await _ask(app, method, path)
    assert answer.status_code == 405
    assert answer.json() == {"detail": "Method Not Allowed"}
    assert answer.headers["allow"] == "GET, HEAD"
    assert answer.headers["cache-control"] == "no-store"


async def test_details_of_a_refused_pool_name_the_error_and_the_pools_state(
    sync_url: str, registry: CollectorRegistry
) -> None:
    refused = sa.create_engine(sa.make_url(sync_url).set(port=free_port()), pool_size=3, max_overflow=0)
    app = FastAPI()
    poolwatch.instrument(app, refused, registry=registry, name="gone", health_details="always")
    try:
        answer = await _ask(app, "GET", "/health/db")
    finally:
        refused.dispose()
    assert answer.status_code == 503
    assert answer.json() == {
        "status": "down",
        "pools": {
            "gone": {
                "status": "down", "latency_seconds": None, "used": 0, "idle": 0, "max": 3, "pending": 0,
                "error": "OperationalError",
            }
        },
    }  # fmt: skip


async def test_details_of_a_healthy_pool_give_its_latency_to_the_microsecond(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    app = FastAPI()
    poolwatch.instrument(app, engine, registry=registry, name="main", health_details="always")
    details = (await _ask(app, "GET", "/health/db")).json()["pools"]["main"]
    latency = details.pop("latency_seconds")
    assert details == {"status": "ok", "used": 0, "idle": 1, "max": 12, "pending": 0}
    # An ok answer came within the deadline (0.5 s by default): its latency is under it.
    assert 0 < latency == round(latency, 6) <= 0.5


async def test_the_stall_window_is_the_one_set(sync_url: str, registry: CollectorRegistry) -> None:
    """A full pool with a caller queued and nothing moving: saturated at first, down (stalled)
    once nothing has moved for health_stall_seconds, here half a second, not the default ten."""
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0, pool_timeout=30)
    app = FastAPI()
    watch = poolwatch.instrument(
        app, engine, registry=registry, name="stuck", health_details="always", health_stall_seconds=0.5
    )
    (recorder,) = watch.recorders
    held = engine.connect()
    waiter = threading.Thread(target=lambda: engine.connect().close())
    waiter.start()
    try:
        give_up = time.monotonic() + 30
        while recorder.pending == 0:
            assert time.monotonic() < give_up, "the caller never queued"
            await asyncio.sleep(0.01)
        first = (await _ask(app, "GET", "/health/db")).json()
        assert first["pools"]["stuck"]["status"] == "saturated"
        await asyncio.sleep(0.6)
        second = (await _ask(app, "GET", "/health/db")).json()
        assert (second["pools"]["stuck"]["status"], second["pools"]["stuck"]["error"]) == ("down", "stalled")
    finally:
        held.close()
        waiter.join(30)
        engine.dispose()
