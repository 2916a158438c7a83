"""An application's own route at one of poolwatch's paths wins, and only a real one.

poolwatch leaves a path alone when the application routes it itself (its own ``/metrics``, a
health route of its own, a page at ``/poolwatch``) and says so once, naming the setting to change.
Anything less than a route of its own at that path takes nothing from poolwatch: an app with no
routes, a route that has no path (a ``Host``), an app that is not a Starlette router at all, or one
whose routes cannot even be listed (counted as poolwatch's own failure, never hiding its endpoint).
Through the layer poolwatch puts outside the application's own middleware, the same decision holds
under a server's ``root_path``: poolwatch's endpoint is never counted as an application request.

In process (httpx over ASGI) on real Starlette apps; tests/test_host_safety.py has the
application's own ``/metrics`` mounted with prometheus_client, over uvicorn too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Host, Route
from structlog.testing import capture_logs

import poolwatch
from poolwatch._log import internal_errors
from poolwatch._serve.middleware import RequestScope
from tests.metrics import parse_text

OWN = b"the application's own answer"


async def _own(request: Request) -> PlainTextResponse:
    return PlainTextResponse(OWN)


@pytest.fixture
def engine(sync_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sync_url, pool_size=1)
    yield engine
    engine.dispose()


async def _get(app: Any, path: str, root_path: str = "") -> httpx.Response:
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        return await client.get(path, follow_redirects=True)


def _is_poolwatchs_metrics(answer: httpx.Response) -> bool:
    return answer.status_code == 200 and "poolwatch_checkouts_total" in answer.text


@pytest.mark.parametrize(
    ("route", "setting"),
    [
        ("/metrics", "metrics_path"),
        ("/health/db", "health_db_path"),
        ("/health/live", "health_live_path"),
        ("/poolwatch", "ui_path"),
        ("/poolwatch/state", "ui_path"),
    ],
)
async def test_a_route_of_the_apps_own_wins_and_the_warning_names_the_setting_once(
    engine: sa.Engine, registry: CollectorRegistry, route: str, setting: str
) -> None:
    app = Starlette(routes=[Route(route, _own)])
    with capture_logs() as logs:
        poolwatch.instrument(app, engine, registry=registry, ui="always")
        for _ in range(2):
            assert (await _get(app, route)).content == OWN
    taken = [(e["path"], e["setting"]) for e in logs if e["event"] == "poolwatch.path_taken"]
    assert taken == [(route, setting)]


async def test_a_route_with_a_trailing_slash_takes_the_path_without_it(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    app = Starlette(routes=[Route("/metrics/", _own)])
    poolwatch.instrument(app, engine, registry=registry)
    assert (await _get(app, "/metrics")).content == OWN


@pytest.mark.parametrize(
    "routes",
    [[], [Host("api.example.com", app=Starlette(routes=[Route("/metrics", _own)]))]],
    ids=["no routes", "a route without a path"],
)
async def test_less_than_a_route_at_the_path_takes_nothing_and_costs_no_error(
    engine: sa.Engine, registry: CollectorRegistry, routes: list[Any]
) -> None:
    app = Starlette(routes=routes)
    poolwatch.instrument(app, engine, registry=registry)
    before = internal_errors.count
    assert _is_poolwatchs_metrics(await _get(app, "/metrics"))
    assert internal_errors.count == before


async def test_an_app_that_is_no_router_takes_nothing_and_costs_no_error(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    async def bare(scope: Any, receive: Any, send: Any) -> None:
        await PlainTextResponse(OWN)(scope, receive, send)

    app = poolwatch.PoolWatchMiddleware(bare, watch=poolwatch.watch(engine, registry=registry))
    before = internal_errors.count
    assert _is_poolwatchs_metrics(await _get(app, "/metrics"))
    assert (await _get(app, "/elsewhere")).content == OWN
    assert internal_errors.count == before


class _Unlistable(list[Any]):
    """Routes that cannot be gone through (an application's router gone wrong)."""

    def __bool__(self) -> bool:
        return True

    def __iter__(self) -> Iterator[Any]:
        raise RuntimeError("these routes cannot be listed")


async def test_routes_that_cannot_be_listed_hide_nothing_and_are_counted(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    app = Starlette()
    poolwatch.instrument(app, engine, registry=registry)
    before = internal_errors.count
    app.router.routes = _Unlistable()
    assert _is_poolwatchs_metrics(await _get(app, "/metrics"))
    assert internal_errors.count == before + 1


class Outer:
    """An application middleware added after instrument(): it runs outside poolwatch's."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


async def test_under_a_root_path_poolwatchs_endpoint_is_no_application_request(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    app = Starlette(routes=[Route("/orders", _own)])
    poolwatch.instrument(app, engine, registry=registry)
    app.add_middleware(Outer)
    assert (await _get(app, "/svc/orders", root_path="/svc")).content == OWN
    assert isinstance(app.middleware_stack, RequestScope)
    assert _is_poolwatchs_metrics(await _get(app, "/svc/metrics", root_path="/svc"))
    answer = await _get(app, "/svc/metrics", root_path="/svc")  # shows the first scrape's count
    assert _is_poolwatchs_metrics(answer)
    counted = parse_text(answer.text).find("poolwatch_request_queries_count")
    assert counted == [({"route": "/orders", "method": "GET"}, 1.0)]


async def test_through_the_outer_layer_the_apps_own_route_is_its_request_decided_once(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    app = Starlette(routes=[Route("/metrics", _own), Route("/scrape", _own)])
    watch = poolwatch.instrument(app, engine, registry=registry, metrics_path="/metrics")
    app.add_middleware(Outer)
    with capture_logs() as logs:
        for _ in range(3):
            assert (await _get(app, "/metrics")).content == OWN
    assert [e["setting"] for e in logs if e["event"] == "poolwatch.path_taken"] == ["metrics_path"]
    # The application's /metrics is an application request: three of them, each counted once.
    assert sum(watch.requests.snapshot()[("/metrics", "GET")].counts) == 3
