"""The request context set outside the application's own middleware (``RequestScope``).

When an application middleware is added after ``instrument()``, it runs outside poolwatch's, and
poolwatch puts a thin layer around the whole stack so the work that middleware does belongs to
the request. That layer must count each request once and only requests: poolwatch's own endpoints
(``/metrics``, health) and the lifespan are not the application's requests. It notes when the
response started, so work the outer middleware does after it is counted as after the response,
and it passes the request through whole (a body the endpoint reads arrives).

Real FastAPI, real asyncpg pool, in process with the lifespan run first, as a server runs it.
tests/test_app_middleware_route.py has the route of a timeout in such a middleware.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import poolwatch
from poolwatch._record import events
from poolwatch._record.events import HeldDuringResponse
from poolwatch._serve.middleware import RequestScope
from tests.metrics import scrape
from tests.test_app_middleware_route import lifespan_of

ROUTE = "/orders/{order_id}"


class HoldAcross:
    """An application middleware that takes a connection before the app runs and gives it back
    a little after the response (a transaction around the request, say)."""

    def __init__(self, app: Any, engine: AsyncEngine) -> None:
        self.app = app
        self.engine = engine

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/held"):
            await self.app(scope, receive, send)
            return
        async with self.engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))
            await self.app(scope, receive, send)
            await asyncio.sleep(0.1)


class AuditAfterwards:
    """An application middleware that writes an audit row once the response has been sent."""

    def __init__(self, app: Any, engine: AsyncEngine) -> None:
        self.app = app
        self.engine = engine

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)
        if scope["type"] == "http" and scope["path"].startswith("/orders"):
            async with self.engine.connect() as connection:
                await connection.execute(sa.text("SELECT 1"))


@pytest.fixture
async def engine(async_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(async_url, pool_size=2, max_overflow=0)
    yield engine
    await engine.dispose()


@pytest.fixture
async def client(engine: AsyncEngine, registry: CollectorRegistry) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()

    @app.get(ROUTE)
    async def read_order(order_id: int) -> dict[str, int]:
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))
        return {"id": order_id}

    @app.post(ROUTE)
    async def write_order(order_id: int, request: Request) -> dict[str, Any]:
        return {"id": order_id, "body": await request.json()}

    @app.get("/held/plain")
    async def plain() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/held/stream")
    async def stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"part"

        return StreamingResponse(body())

    poolwatch.instrument(app, engine, registry=registry, name="orders", held_during_response_seconds=0.05)
    app.add_middleware(AuditAfterwards, engine=engine)  # outside poolwatch's middleware
    app.add_middleware(HoldAcross, engine=engine)
    transport = httpx.ASGITransport(app=app)
    async with lifespan_of(app), httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert isinstance(app.middleware_stack, RequestScope)
        yield client


async def test_each_request_is_counted_once_and_poolwatchs_own_endpoints_not_at_all(
    client: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    for path in ("/metrics", "/health/live", "/health/db", "/metrics"):
        assert (await client.get(path)).status_code == 200, path
    assert (await client.get("/orders/7")).status_code == 200
    samples = scrape(registry)
    # The lifespan, two scrapes and two health checks are not requests of the application.
    assert samples.find("poolwatch_request_queries_count") == [({"route": ROUTE, "method": "GET"}, 1.0)]
    # The endpoint's statement and the audit's: both of this one request, none counted twice.
    assert samples.value("poolwatch_request_queries_sum", route=ROUTE, method="GET") == 2


async def test_work_after_the_response_in_an_outer_middleware_is_counted_as_after_it(
    client: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    assert (await client.get("/orders/8")).status_code == 200
    samples = scrape(registry)
    assert samples.value("poolwatch_checkouts_after_response_total", pool="orders", route=ROUTE) == 1


async def test_the_request_body_reaches_the_endpoint_through_the_outer_layer(
    client: httpx.AsyncClient,
) -> None:
    answer = await client.post("/orders/9", json={"qty": 3})
    assert (answer.status_code, answer.json()) == (200, {"id": 9, "body": {"qty": 3}})


async def test_a_connection_held_across_the_response_is_timed_from_its_start_and_judged_by_its_body(
    client: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    """Taken before the response started and returned 0.1 s after: observed as held after the
    response. Past the 0.05 s threshold only a long body (here a stream) is reported; a plain,
    sized body is not, though held as long."""
    taken: list[object] = []
    previous = events.set_sinks([taken.append])
    try:
        assert (await client.get("/held/plain")).status_code == 200
        assert (await client.get("/held/stream")).content == b"part"
    finally:
        events.set_sinks(previous)
    samples = scrape(registry)
    for route in ("/held/plain", "/held/stream"):
        assert samples.value("poolwatch_held_after_response_seconds_count", pool="orders", route=route) == 1
        assert samples.value("poolwatch_held_after_response_seconds_sum", pool="orders", route=route) >= 0.1
    held = [event for event in taken if isinstance(event, HeldDuringResponse)]
    assert [(event.route, event.response) for event in held] == [("/held/stream", "streaming")]
