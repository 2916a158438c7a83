"""Poolwatch's endpoints under a root_path: a mounted app, or a server's --root-path.

ASGI servers and Starlette's ``Mount`` keep the full path in ``scope["path"]`` and the prefix the app
sits under in ``root_path``. Poolwatch's middleware strips that prefix, as Starlette's router does,
to find its own ``/metrics`` and health endpoints: only at a slash boundary, and a path that does not
start with the prefix is taken as it is. Driven in process (httpx's ASGITransport) so that mutation
testing sees the middleware's code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import poolwatch
from tests.metrics import parse_text

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@pytest.fixture
def engine(sync_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0)
    yield engine
    engine.dispose()


@pytest.fixture
def inner(engine: sa.Engine, registry: CollectorRegistry) -> Iterator[Starlette]:
    """The application poolwatch instruments: its own routes, one of which uses the database."""

    def item(request: Request) -> PlainTextResponse:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        return PlainTextResponse(f"item {request.path_params['item_id']}")

    def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse("home")

    app = Starlette(routes=[Route("/", home), Route("/items/{item_id}", item)])
    watch = poolwatch.instrument(app, engine, registry=registry, name="mounted")
    yield app
    watch.close()


def _client(app: object, root_path: str = "") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, root_path=root_path)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://test")


@pytest.fixture
async def mounted(inner: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an outer app that mounts the instrumented one at /api."""
    async with _client(Starlette(routes=[Mount("/api", app=inner)])) as client:
        yield client


def _families(text: str) -> list[str]:
    return [family.name for family in text_string_to_metric_families(text)]


# -- under a Mount ------------------------------------------------------------------------------


async def test_metrics_of_a_mounted_app_are_served_under_its_prefix(
    mounted: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    assert (await mounted.get("/api/items/7")).text == "item 7"
    answer = await mounted.get("/api/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == METRICS_TYPE
    assert answer.headers["cache-control"] == "no-store"
    samples = parse_text(answer.text)
    assert samples.value("poolwatch_checkouts_total", pool="mounted") == 1
    # The app's own route, recorded under its full template.
    assert (
        samples.value(
            "poolwatch_use_seconds_count", pool="mounted", route="/api/items/{item_id}", method="GET"
        )
        == 1
    )
    # The outer app has no /metrics of its own, and the mounted one answers nothing else there.
    assert (await mounted.get("/metrics")).status_code == 404
    assert (await mounted.get("/api/metrics/")).status_code == 404


async def test_the_registrys_other_metrics_are_served_first_then_poolwatchs(
    mounted: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    # Registered after poolwatch's collector, but written first: poolwatch writes its own families
    # itself, after the rest of the registry.
    Counter("orders_placed", "Orders placed.", registry=registry).inc(3)
    text = (await mounted.get("/api/metrics")).text
    families = _families(text)
    ours = [name.startswith("poolwatch_") for name in families]
    assert families[:2] == ["orders_placed", "orders_placed_created"] and ours[2:] == [True] * (
        len(families) - 2
    )
    assert parse_text(text).value("orders_placed_total") == 3


async def test_openmetrics_under_a_mount_ends_with_eof_after_poolwatchs_families(
    mounted: httpx.AsyncClient, registry: CollectorRegistry
) -> None:
    Counter("orders_placed", "Orders placed.", registry=registry).inc()
    answer = await mounted.get("/api/metrics", headers={"Accept": "application/openmetrics-text"})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/openmetrics-text")
    assert answer.text.endswith("# EOF\n") and answer.text.count("# EOF") == 1
    assert answer.text.index("orders_placed") < answer.text.index("poolwatch_connections")


async def test_metrics_under_a_mount_answer_head_and_refuse_other_methods(mounted: httpx.AsyncClient) -> None:
    plain = {"Accept-Encoding": "identity"}
    got = await mounted.get("/api/metrics", headers=plain)
    head = await mounted.head("/api/metrics", headers=plain)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == METRICS_TYPE
    assert head.headers["content-length"] == got.headers["content-length"] == str(len(got.content))
    refused = await mounted.post("/api/metrics")
    assert refused.status_code == 405
    assert refused.headers["allow"] == "GET, HEAD"
    assert refused.json() == {"detail": "Method Not Allowed"}


async def test_metrics_under_a_mount_are_gzipped_when_accepted(mounted: httpx.AsyncClient) -> None:
    answer = await mounted.get("/api/metrics", headers={"Accept-Encoding": "gzip"})
    assert answer.headers["content-encoding"] == "gzip"
    assert "poolwatch_connections" in answer.text  # httpx decompressed it


async def test_health_of_a_mounted_app_is_served_under_its_prefix(mounted: httpx.AsyncClient) -> None:
    live = await mounted.get("/api/health/live")
    assert (live.status_code, live.json()["status"]) == (200, "ok")
    assert (await mounted.get("/health/live")).status_code == 404


# -- a root_path given by the server ------------------------------------------------------------


async def test_a_server_root_path_is_stripped_at_a_slash_boundary(inner: Starlette) -> None:
    async with _client(inner, root_path="/svc") as client:
        answer = await client.get("/svc/metrics")
        assert answer.status_code == 200 and answer.headers["content-type"] == METRICS_TYPE
        assert "poolwatch_connections" in answer.text
        assert (await client.get("/svc/items/2")).text == "item 2"


async def test_a_root_path_that_only_begins_the_first_segment_is_not_stripped(inner: Starlette) -> None:
    # root_path /met and path /metrics: no slash after the prefix, so the path is /metrics, as
    # Starlette's router reads it too.
    async with _client(inner, root_path="/met") as client:
        answer = await client.get("/metrics")
        assert answer.status_code == 200 and answer.headers["content-type"] == METRICS_TYPE
        assert "poolwatch_connections" in answer.text


async def test_a_path_outside_the_root_path_is_taken_whole(inner: Starlette) -> None:
    # /web/metrics under root_path /api: not poolwatch's /metrics (nor /api's), the app's 404.
    async with _client(inner, root_path="/api") as client:
        answer = await client.get("/web/metrics")
        assert (answer.status_code, answer.text) == (404, "Not Found")
        assert (await client.get("/web/items/1")).status_code == 404


async def test_the_root_path_itself_is_the_apps_root_not_poolwatchs_endpoint(inner: Starlette) -> None:
    # An app under root_path /metrics asked for /metrics: what is left is empty, the app's own
    # root (Starlette redirects it to the slash), never poolwatch's /metrics.
    async with _client(inner, root_path="/metrics") as client:
        answer = await client.get("/metrics")
        assert answer.status_code == 307
        assert answer.headers["location"] == "http://test/metrics/"
        assert (await client.get("/metrics/")).text == "home"
        # Its own /metrics is one level down.
        assert "poolwatch_connections" in (await client.get("/metrics/metrics")).text
