"""Route attribution, queries per request, query timing and the slow-query log (issue 3)."""

from __future__ import annotations

import gc
import random
import string
from collections.abc import AsyncIterator

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import create_async_engine
from structlog.testing import capture_logs

from tests import attribution_app
from tests.fault_fixtures import SERVINGS, client_of, wait_until_async
from tests.metrics import scrape

TEMPLATES = {
    "/users/{user_id}",
    "/sync/items/{item_id}",
    "/api/v1/orders/{order_id}",
    "/admin/reports/{report_id}",
    "/billing/invoices/{invoice_id}",
    "/admin/v2/audits/{audit_id}",
}


@pytest.fixture
async def app_and_engines(async_url: str, sync_url: str, registry: CollectorRegistry):  # type: ignore[no-untyped-def]
    async_engine = create_async_engine(async_url, pool_size=5, max_overflow=5)
    sync_engine = sa.create_engine(sync_url, pool_size=5, max_overflow=5)
    app, watch = attribution_app.build_app(
        async_engine, sync_engine, registry, slow_query_seconds=0.02, leak_threshold_seconds=30
    )
    yield app, registry
    attribution_app.DROPPED.clear()
    gc.collect()
    watch.close()
    await async_engine.dispose()
    sync_engine.dispose()


@pytest.fixture(params=SERVINGS)
async def client(app_and_engines, request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:  # type: ignore[no-untyped-def]
    """Each test twice: in-process (the unit layer) and over HTTP to a real uvicorn."""
    app, _ = app_and_engines
    async with client_of(app, request.param) as client:
        yield client


async def all_returned(registry: CollectorRegistry) -> None:
    """Wait until no pool has a connection out. Under a server the response reaches the client
    before the app's work after it is done: a dependency's clean-up, a stream's end, a background
    task; the checkin and its counts come with that work."""
    await wait_until_async(
        lambda: not any(used for _, used in scrape(registry).find("poolwatch_connections", state="used")),
        10,
        "a connection was never returned",
    )


def routes_seen(registry: CollectorRegistry) -> set[str]:
    samples = scrape(registry)
    return {labels["route"] for labels, _ in samples.find("poolwatch_use_seconds_count")} | {
        labels["route"] for labels, _ in samples.find("poolwatch_request_queries_count")
    }


async def test_route_labels_are_templates_and_do_not_grow_with_paths(
    client: httpx.AsyncClient,
    app_and_engines,  # type: ignore[no-untyped-def]
) -> None:
    _, registry = app_and_engines
    for user_id in range(1, 501):
        assert (await client.get(f"/users/{user_id}")).status_code == 200
    await all_returned(registry)
    series_after_users = len(scrape(registry))
    rng = random.Random(7)
    for _ in range(500):
        junk = "".join(rng.choices(string.ascii_lowercase + string.digits, k=12))
        assert (await client.get(f"/nope/{junk}")).status_code == 404
    await all_returned(registry)
    samples = scrape(registry)
    routes = routes_seen(registry)
    assert routes <= {"/users/{user_id}", "<unmatched>", "<none>"}
    assert "/users/{user_id}" in routes and "<unmatched>" in routes
    # 500 distinct unknown paths add the <unmatched> series once, not 500 times.
    assert len(samples) - series_after_users <= 30
    assert samples.value("poolwatch_request_queries_count", route="/users/{user_id}", method="GET") == 500
    assert samples.value("poolwatch_request_queries_count", route="<unmatched>", method="GET") == 500
    assert (
        samples.value("poolwatch_use_seconds_count", pool="async", route="/users/{user_id}", method="GET")
        == 500
    )
    assert not any(
        labels.get("route") == "/users/1" or "nope" in labels.get("route", "")
        for (_, labels), _ in samples.items()
    )


async def test_each_endpoint_shape_gets_its_full_template(
    client: httpx.AsyncClient,
    app_and_engines,  # type: ignore[no-untyped-def]
) -> None:
    _, registry = app_and_engines
    paths = ("/users/3", "/sync/items/4", "/api/v1/orders/5", "/admin/reports/6",
             "/billing/invoices/7", "/admin/v2/audits/8")  # fmt: skip
    for path in paths:
        response = await client.get(path)
        assert response.status_code == 200, (path, response.text)
    await all_returned(registry)
    samples = scrape(registry)
    assert (
        samples.value("poolwatch_use_seconds_count", pool="async", route="/users/{user_id}", method="GET")
        == 1
    )
    assert (
        samples.value("poolwatch_use_seconds_count", pool="sync", route="/sync/items/{item_id}", method="GET")
        == 1
    )
    assert (
        samples.value(
            "poolwatch_use_seconds_count", pool="async", route="/api/v1/orders/{order_id}", method="GET"
        )
        == 1
    )
    assert (
        samples.value(
            "poolwatch_use_seconds_count", pool="async", route="/admin/reports/{report_id}", method="GET"
        )
        == 1
    )
    assert (
        samples.value(
            "poolwatch_use_seconds_count", pool="async", route="/billing/invoices/{invoice_id}", method="GET"
        )
        == 1
    )
    assert (
        samples.value(
            "poolwatch_use_seconds_count", pool="async", route="/admin/v2/audits/{audit_id}", method="GET"
        )
        == 1
    )
    assert routes_seen(registry) >= TEMPLATES


async def test_n_plus_one_is_counted_per_request(
    client: httpx.AsyncClient,
    app_and_engines,  # type: ignore[no-untyped-def]
) -> None:
    _, registry = app_and_engines
    # Warm the dialect first: its own first-connect statements are not the endpoint's.
    await client.get("/users/1")
    for count in (3, 10):
        assert (await client.get(f"/nplus1/{count}")).status_code == 200
    await all_returned(registry)
    samples = scrape(registry)
    route = "/nplus1/{count}"
    assert samples.value("poolwatch_request_queries_count", route=route, method="GET") == 2
    # 1 + 3 and 1 + 10 statements, plus the session's BEGIN-less ROLLBACK is not a statement.
    assert samples.value("poolwatch_request_queries_sum", route=route, method="GET") == (1 + 3) + (1 + 10)
    assert samples.value("poolwatch_request_queries_bucket", route=route, method="GET", le="4.0") == 1
    assert samples.value("poolwatch_request_queries_bucket", route=route, method="GET", le="16.0") == 2


async def test_query_timing_and_slow_query_log_without_literals(
    client: httpx.AsyncClient,
    app_and_engines,  # type: ignore[no-untyped-def]
) -> None:
    _, registry = app_and_engines
    with capture_logs() as events:
        assert (await client.get("/slow-query")).status_code == 200
    slow = [e for e in events if e["event"] == "poolwatch.slow_query"]
    assert len(slow) == 1, events
    [event] = slow
    assert event["pool"] == "async" and event["route"] == "/slow-query"
    assert event["operation"] == "SELECT" and event["seconds"] >= 0.02
    assert "canary" not in repr(event) and "example.com" not in repr(event)
    assert "pg_sleep(?)" in event["fingerprint"] and "= ?" in event["fingerprint"]
    await all_returned(registry)
    samples = scrape(registry)
    assert samples.value("poolwatch_query_seconds_count", pool="async", operation="SELECT") >= 1
    for (_, labels), _ in samples.items():
        for value in labels.values():
            assert "SELECT" not in value or value == "SELECT", labels
            assert "canary" not in value


async def test_query_errors_are_counted_by_operation_and_class(
    client: httpx.AsyncClient,
    app_and_engines,  # type: ignore[no-untyped-def]
) -> None:
    _, registry = app_and_engines
    await client.get("/users/1")  # the dialect's first-connect statements belong to no test here
    assert (await client.get("/fail")).status_code == 500
    await all_returned(registry)
    samples = scrape(registry)
    # The class the driver call raised (asyncpg's, adapted by SQLAlchemy), never the message.
    assert samples.find("poolwatch_query_errors_total") == [
        ({"pool": "async", "operation": "SELECT", "error": "ProgrammingError"}, 1.0)
    ]
    # The failed statement is still one of the request's statements: one good, one failed.
    assert samples.value("poolwatch_request_queries_count", route="/fail", method="GET") == 1
    assert samples.value("poolwatch_request_queries_sum", route="/fail", method="GET") == 2
    assert "no_such_table" not in repr(samples)


# SQLAlchemy warns when the GC reclaims a connection: exactly what this test does on purpose.
@pytest.mark.filterwarnings("ignore:The garbage collector is trying to clean up")
async def test_gc_reclaimed_sessions_are_counted_with_their_route(
    client: httpx.AsyncClient,
    app_and_engines,  # type: ignore[no-untyped-def]
) -> None:
    _, registry = app_and_engines
    with capture_logs() as events:
        assert (await client.get("/drop/async")).status_code == 200
        assert (await client.get("/drop/sync")).status_code == 200
        assert scrape(registry).value("poolwatch_connections", pool="async", state="used") == 1
        assert scrape(registry).value("poolwatch_connections", pool="sync", state="used") == 1
        attribution_app.DROPPED.clear()

        def collected() -> bool:
            gc.collect()
            return not any(used for _, used in scrape(registry).find("poolwatch_connections", state="used"))

        await wait_until_async(collected, 10, "the dropped sessions' connections never came back")
    samples = scrape(registry)
    assert samples.value("poolwatch_gc_reclaimed_total", pool="async", route="/drop/async") == 1
    assert samples.value("poolwatch_gc_reclaimed_total", pool="sync", route="/drop/sync") == 1
    reclaimed = [e for e in events if e["event"] == "poolwatch.gc_reclaimed"]
    assert {e["route"] for e in reclaimed} == {"/drop/async", "/drop/sync"}
    for event in reclaimed:
        # The site may be shown relative to the application's root.
        assert attribution_app.__file__.endswith(event["site"].rsplit(":", 1)[0]), event
        assert event["function"].endswith(("drop_async", "drop_sync"))


async def test_failing_dependency_returns_its_connection(
    client: httpx.AsyncClient,
    app_and_engines,  # type: ignore[no-untyped-def]
) -> None:
    _, registry = app_and_engines
    assert (await client.get("/broken")).status_code == 500
    await all_returned(registry)
    samples = scrape(registry)
    assert samples.value("poolwatch_use_seconds_count", pool="async", route="/broken", method="GET") == 1
    assert sum(v for _, v in samples.find("poolwatch_leaks_total")) == 0
    assert sum(v for _, v in samples.find("poolwatch_gc_reclaimed_total")) == 0


async def test_streaming_and_background_work_outlive_the_request(
    client: httpx.AsyncClient,
    app_and_engines,  # type: ignore[no-untyped-def]
) -> None:
    _, registry = app_and_engines
    await client.get("/users/1")  # the dialect's first-connect statements belong to no test here
    response = await client.get("/stream")
    assert response.text == "0\n1\n2\n"
    assert (await client.get("/background")).status_code == 200
    await all_returned(registry)
    # The request is counted when the app returns, after the background task checked in.
    await wait_until_async(
        lambda: scrape(registry).find("poolwatch_request_queries_count", route="/background"),
        10,
        "the /background request never finished",
    )
    samples = scrape(registry)
    assert samples.value("poolwatch_use_seconds_count", pool="async", route="/stream", method="GET") == 1
    assert samples.value("poolwatch_use_seconds_count", pool="async", route="/background", method="GET") == 1
    assert samples.value("poolwatch_checkouts_after_response_total", pool="async", route="/stream") == 1
    assert samples.value("poolwatch_checkouts_after_response_total", pool="async", route="/background") == 1
    assert samples.value("poolwatch_request_queries_sum", route="/stream", method="GET") == 3
    assert samples.value("poolwatch_request_queries_sum", route="/background", method="GET") == 1
    assert samples.find("poolwatch_checkouts_after_response_total", route="/users/{user_id}") == []
