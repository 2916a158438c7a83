"""Work done in the application's own HTTP middleware belongs to the request's route.

A FastAPI app whose middleware looks an API key up in PostgreSQL (asyncpg) before the router runs,
added before ``instrument()`` (inside poolwatch's middleware) and after it (outside), as a pure ASGI
middleware and as ``@app.middleware("http")``. The request goes to ``/orders/{order_id}``; when
the lookup times out on a full pool, the timeout is counted and logged under that route, not under
``<unmatched>`` (before: the router has not run yet) nor ``<none>`` (after: no request context yet).

Served by a real uvicorn, and in-process with the lifespan run first, as a server runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import poolwatch
from poolwatch._record import events
from poolwatch._record.events import Event, PoolTimeout
from poolwatch._serve.middleware import RequestScope
from tests.fault_fixtures import served_here
from tests.metrics import scrape

ROUTE = "/orders/{order_id}"


class ApiKeyLookup:
    """A pure ASGI middleware that reads the caller's key from the database before routing."""

    def __init__(self, app: Any, engine: AsyncEngine) -> None:
        self.app = app
        self.engine = engine

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            async with self.engine.connect() as connection:
                await connection.execute(sa.text("SELECT 1"))
        await self.app(scope, receive, send)


def build_app(engine: AsyncEngine, registry: CollectorRegistry, kind: str, order: str) -> FastAPI:
    app = FastAPI()

    @app.get(ROUTE)
    async def read_order(order_id: int) -> dict[str, int]:
        return {"id": order_id}

    def add_lookup() -> None:
        if kind == "asgi":
            app.add_middleware(ApiKeyLookup, engine=engine)
        else:

            async def lookup(
                request: Request, call_next: Callable[[Request], Awaitable[Response]]
            ) -> Response:
                async with engine.connect() as connection:
                    await connection.execute(sa.text("SELECT 1"))
                return await call_next(request)

            app.middleware("http")(lookup)

    if order == "before":
        add_lookup()
        poolwatch.instrument(app, engine, registry=registry, name="keys")
    else:
        poolwatch.instrument(app, engine, registry=registry, name="keys")
        add_lookup()
    return app


@contextlib.asynccontextmanager
async def lifespan_of(app: Any) -> AsyncIterator[None]:
    """The ASGI lifespan start-up and shut-down, as a server sends them."""
    to_app: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def send(message: dict[str, Any]) -> None:
        await from_app.put(message)

    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, to_app.get, send))
    await to_app.put({"type": "lifespan.startup"})
    assert (await from_app.get())["type"] == "lifespan.startup.complete"
    try:
        yield
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        assert (await from_app.get())["type"] == "lifespan.shutdown.complete"
        await task


@contextlib.asynccontextmanager
async def client_of(app: Any, serving: str) -> AsyncIterator[httpx.AsyncClient]:
    if serving == "in-process":
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with lifespan_of(app), httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client
    else:
        async with served_here(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield client


@pytest.fixture
async def engine(async_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(async_url, pool_size=1, max_overflow=0, pool_timeout=0.3)
    yield engine
    await engine.dispose()


@pytest.mark.parametrize("serving", ["in-process", "uvicorn"])
@pytest.mark.parametrize("kind", ["asgi", "http"])
@pytest.mark.parametrize("order", ["before", "after"])
async def test_a_timeout_in_the_apps_middleware_names_the_route(
    engine: AsyncEngine, registry: CollectorRegistry, order: str, kind: str, serving: str
) -> None:
    taken: list[Event] = []
    previous = events.set_sinks([taken.append])
    try:
        app = build_app(engine, registry, kind, order)
        async with client_of(app, serving) as client:
            async with engine.connect() as held:  # the pool's only connection
                await held.execute(sa.text("SELECT 1"))
                assert (await client.get("/orders/7")).status_code == 500
            assert (await client.get("/orders/8")).status_code == 200
        # The extra layer is there only when an application middleware runs outside poolwatch's
        # (FastAPI's and Starlette's own outer layers do not count).
        assert isinstance(app.middleware_stack, RequestScope) == (order == "after")
    finally:
        events.set_sinks(previous)
    samples = scrape(registry)
    assert samples.value("poolwatch_timeouts_total", pool="keys", route=ROUTE) == 1
    assert samples.total("poolwatch_timeouts_total", pool="keys") == 1
    [timeout] = [e for e in taken if isinstance(e, PoolTimeout)]
    assert timeout.route == ROUTE and timeout.fields()["route"] == ROUTE
    # The lookup of the request that went through is the route's too: its hold time and statement.
    assert samples.value("poolwatch_use_seconds_count", pool="keys", route=ROUTE, method="GET") == 1
    assert samples.value("poolwatch_request_queries_sum", route=ROUTE, method="GET") == 1
    assert {labels["route"] for labels, _ in samples.find("poolwatch_request_queries_count")} == {ROUTE}
