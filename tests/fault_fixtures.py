"""Fixtures for the health and fault tests: the proxy, a served app, and small helpers.

Import the fixtures into a test module with ``from tests.fault_fixtures import proxy  # noqa``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
import uvicorn
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

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


def wait_until(condition: Callable[[], object], seconds: float, message: str) -> None:
    """Poll ``condition`` until it is true; fail with ``message`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.01)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return float(scrape(registry).value(name, **labels))


def total(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return sum(v for _, v in scrape(registry).find(name, **labels))
