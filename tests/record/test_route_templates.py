"""Route templates, with no database: the route label a checkout gets from the request it belongs to,
through real FastAPI and Starlette routing (path parameters, included routers with a prefix, mounted
sub-applications, plain Starlette routes) and for paths no route matched."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import poolwatch
from poolwatch._capture.pool_hooks import recorder_of
from poolwatch._record.context import NO_REQUEST, UNMATCHED, RequestContext, route_label
from tests.fake_dbapi import engine_for_test


@pytest.fixture
def engine() -> Iterator[sa.Engine]:
    with engine_for_test() as (engine, _):
        yield engine


def _app(engine: sa.Engine) -> FastAPI:
    app = FastAPI()

    def use_a_connection() -> str:
        engine.pool.connect().close()
        return "ok"

    @app.get("/users/{user_id}")
    async def user(user_id: int) -> str:
        return use_a_connection()

    router = APIRouter()

    @router.get("/items/{item_id}")
    async def item(item_id: str) -> str:
        return use_a_connection()

    app.include_router(router, prefix="/api/v1")

    async def thing(request: Request) -> PlainTextResponse:
        return PlainTextResponse(use_a_connection())

    app.mount("/sub", Starlette(routes=[Route("/things/{thing_id}", thing)]))

    async def plain(request: Request) -> PlainTextResponse:
        return PlainTextResponse(use_a_connection())

    app.add_route("/plain/{name}", plain)
    return app


def test_checkouts_are_labelled_with_the_route_template(engine: sa.Engine) -> None:
    app = _app(engine)
    watch = poolwatch.instrument(app, engine, registry=CollectorRegistry(), name="routes")
    with TestClient(app) as client:
        for path in ("/users/1", "/users/2", "/api/v1/items/a", "/sub/things/x", "/plain/p", "/nowhere"):
            client.get(path)
    recorder = recorder_of(engine.pool)
    assert recorder is not None
    uses = {route: sum(copy.counts) for (route, method), copy in recorder.snapshot().use.items()}
    methods = {method for (route, method) in recorder.snapshot().use}
    requests = {route for (route, method) in watch.requests.snapshot()}
    watch.close()
    assert uses == {
        NO_REQUEST: 0,
        "/users/{user_id}": 2,
        "/api/v1/items/{item_id}": 1,
        "/sub/things/{thing_id}": 1,
        "/plain/{name}": 1,
    }
    assert methods == {"<none>", "GET"}
    assert UNMATCHED in requests  # statements per request, for the path no route matched
    assert not any(raw in str(uses) for raw in ("/users/1", "/items/a", "/things/x", "/plain/p"))


def test_outside_any_request_and_before_routing() -> None:
    assert route_label(None) == NO_REQUEST
    context = RequestContext({"type": "http", "path": "/users/1"})
    assert context.route == UNMATCHED  # no route in the scope (yet)
    assert context.resolved_route is None  # so it is looked up again once routing is done
