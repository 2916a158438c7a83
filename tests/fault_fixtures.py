"""Fixtures for the health and fault tests: the proxy, a served app, and small helpers.

Import the fixtures into a test module with ``from tests.fault_fixtures import proxy  # noqa``.

The project's rule is a real uvicorn: ``served`` runs one in a thread of its own (for sync engines,
whose connections belong to no loop), ``served_here`` on the test's own event loop (for async
engines, whose connections belong to the loop that opened them). ``client_of`` and
``sync_client_of`` give a test the same client API whether the app runs in-process (the unit layer)
or under uvicorn, so one test body covers both.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Literal

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import poolwatch
from tests.metrics import scrape
from tests.proxy import FaultProxy

# Trust auth ignores passwords, so this one can travel in every DSN and must surface nowhere.
CANARY = "canary-pw-7f3a9c"


@pytest.fixture
def proxy(postgres_url: str) -> Iterator[FaultProxy]:
    upstream = make_url(postgres_url)
    fault = FaultProxy(upstream.port or 5432, upstream.host or "127.0.0.1", lifetime=120).start()
    try:
        yield fault
    finally:
        fault.stop()


def proxied(postgres_url: str, proxy: FaultProxy, driver: str, password: str | None = None) -> str:
    """The test server's URL through ``proxy``, for ``driver`` (asyncpg or psycopg)."""
    url = make_url(postgres_url).set(drivername=f"postgresql+{driver}", host="127.0.0.1", port=proxy.port)
    if password is not None:
        url = url.set(password=password)
    return url.render_as_string(hide_password=False)


def make_app(
    engine: AsyncEngine, registry: CollectorRegistry, **settings: Any
) -> tuple[Starlette, poolwatch.PoolWatch]:
    """A small app on ``engine``: ``/one`` runs SELECT 1, ``/sleep/{s}`` holds a connection."""

    async def one(request: Request) -> JSONResponse:
        async with engine.connect() as connection:
            value = (await connection.execute(sa.text("SELECT 1"))).scalar()
        return JSONResponse({"one": value})

    async def sleep(request: Request) -> JSONResponse:
        seconds = float(request.path_params["seconds"])
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT pg_sleep(:s)"), {"s": seconds})
        return JSONResponse({"slept": seconds})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await engine.dispose()

    app = Starlette(routes=[Route("/one", one), Route("/sleep/{seconds}", sleep)], lifespan=lifespan)
    watch = poolwatch.instrument(app, engine, registry=registry, name="primary", **settings)
    return app, watch


def make_sync_app(
    engine: Engine, registry: CollectorRegistry, **settings: Any
) -> tuple[Starlette, poolwatch.PoolWatch]:
    """``make_app`` for a sync engine: the same routes, as sync endpoints run in the threadpool."""

    def one(request: Request) -> JSONResponse:
        with engine.connect() as connection:
            value = connection.execute(sa.text("SELECT 1")).scalar()
        return JSONResponse({"one": value})

    def sleep(request: Request) -> JSONResponse:
        seconds = float(request.path_params["seconds"])
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT pg_sleep(:s)"), {"s": seconds})
        return JSONResponse({"slept": seconds})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            engine.dispose()

    app = Starlette(routes=[Route("/one", one), Route("/sleep/{seconds}", sleep)], lifespan=lifespan)
    watch = poolwatch.instrument(app, engine, registry=registry, name="primary", **settings)
    return app, watch


async def call(endpoint: object, method: str = "GET") -> tuple[int, bytes]:
    """Drive an ASGI endpoint directly on this loop (an async engine is bound to it)."""
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": "/health/db", "headers": []}
    await endpoint(scope, receive, send)  # type: ignore[operator]
    return int(sent[0]["status"]), bytes(sent[1]["body"])  # type: ignore[call-overload]


class Served:
    """An ASGI app served by a real uvicorn in a thread of its own, on a free 127.0.0.1 port."""

    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, lifespan="on", log_level="warning", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        wait_until(lambda: self.server.started, 10, "uvicorn did not start")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@contextlib.contextmanager
def served(app: Any) -> Iterator[str]:
    with Served(app) as server:
        yield server.url


@contextlib.asynccontextmanager
async def served_here(app: Any) -> AsyncIterator[str]:
    """``app`` under a real uvicorn on the running event loop, on a free 127.0.0.1 port; its URL."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, lifespan="on", log_config=None, log_level="warning",
        access_log=False,
    )  # fmt: skip
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        await wait_until_async(lambda: server.started or serving.done(), 10, "uvicorn did not start")
        if serving.done():
            serving.result()  # its start-up error
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 15)


Serving = Literal["in-process", "uvicorn"]
SERVINGS: list[Serving] = ["in-process", "uvicorn"]


@contextlib.asynccontextmanager
async def client_of(app: Any, serving: Serving) -> AsyncIterator[httpx.AsyncClient]:
    """An async client of ``app``: through httpx's ASGI transport, or over TCP to a real uvicorn on
    this loop. An exception in the app is a 500 either way, as a server would answer."""
    if serving == "in-process":
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            yield client
    else:
        async with served_here(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield client


@contextlib.contextmanager
def sync_client_of(app: Any, serving: Serving) -> Iterator[httpx.Client]:
    """A sync client of ``app``: starlette's TestClient, or a real uvicorn in a thread of its own."""
    if serving == "in-process":
        with TestClient(app) as client:
            yield client
    else:
        with served(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            yield client


def wait_until(condition: Callable[[], object], seconds: float, message: str) -> None:
    """Poll ``condition`` until it is true; fail with ``message`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.01)


async def wait_until_async(condition: Callable[[], object], seconds: float, message: str) -> None:
    """``wait_until`` for a test on an event loop: the loop keeps running while it polls."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        await asyncio.sleep(0.01)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return float(scrape(registry).value(name, **labels))


def total(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return sum(v for _, v in scrape(registry).find(name, **labels))
