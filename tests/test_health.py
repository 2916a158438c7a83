"""/health/live and /health/db served by a real uvicorn, against real PostgreSQL (via the proxy)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import structlog
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette

import poolwatch
from tests.fault_fixtures import CANARY, make_app, proxied, proxy, served, value, wait_until
from tests.metrics import scrape
from tests.proxy import FaultProxy

__all__ = ["proxy"]  # the fixture, imported for pytest

TOKEN = "s3cret-health-token"


def async_engine(url: str, **options: Any) -> Any:
    return create_async_engine(url, **{"pool_size": 2, "max_overflow": 0, **options})


def test_live_never_touches_the_database(
    postgres_url: str, proxy: FaultProxy, registry: CollectorRegistry
) -> None:
    proxy.set_mode("refuse")
    app, _ = make_app(async_engine(proxied(postgres_url, proxy, "asyncpg")), registry)
    with served(app) as url, httpx.Client(base_url=url) as client:
        for _ in range(3):
            response = client.get("/health/live")
            assert (response.status_code, response.json()) == (200, {"status": "ok"})
        head = client.head("/health/live")
        assert (head.status_code, head.content) == (200, b"")
        db = client.get("/health/db")
        assert (db.status_code, db.json()) == (503, {"status": "down"})
    # Only /health/db knocked on the proxy.
    assert proxy.accepted == 1


@pytest.mark.parametrize(("setting", "expected"), [(503, "saturated"), (200, "degraded")])
def test_a_full_pool_handing_out_connections_is_saturated_without_new_connections(
    postgres_url: str, proxy: FaultProxy, registry: CollectorRegistry, setting: int, expected: str
) -> None:
    """Every connection busy and callers queued, but connections keep coming back: saturated.

    (The same full pool with nothing coming back is a stalled database: see test_probe_stalls.)
    """
    engine = async_engine(proxied(postgres_url, proxy, "asyncpg"), pool_timeout=30)
    app, _ = make_app(engine, registry, health_saturated_status=setting, health_details="always")
    stop = threading.Event()

    def busy(url: str) -> list[int]:
        with httpx.Client(base_url=url, timeout=60) as own:
            statuses = []
            while not stop.is_set():
                statuses.append(own.get("/sleep/0.05").status_code)
            return statuses

    with served(app) as url, httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(6) as load:
        assert client.get("/health/db").json()["status"] == "ok"
        workers = [load.submit(busy, url) for _ in range(6)]
        try:
            # Both connections open, and callers queued for them.
            wait_until(
                lambda: (
                    value(registry, "poolwatch_connects_total", pool="primary") == 2
                    and value(registry, "poolwatch_pending_requests", pool="primary") >= 2
                ),
                10,
                "the load never queued",
            )
            connects = value(registry, "poolwatch_connects_total", pool="primary")
            answers = []
            for _ in range(5):
                started = time.monotonic()
                response = client.get("/health/db")
                answers.append((response.status_code, response.json(), time.monotonic() - started))
            assert value(registry, "poolwatch_connects_total", pool="primary") == connects
        finally:
            stop.set()
        assert all(status == 200 for worker in workers for status in worker.result())
    # A check may catch the pool with a connection back in it for an instant (then probed: ok);
    # one that finds it full and queued sees connections flowing: saturated, never down.
    shown = [(status, body["status"]) for status, body, _ in answers]
    assert set(shown) <= {(setting, expected), (200, "ok")}, shown
    assert (setting, expected) in shown
    # Within the deadline, never queued behind the callers (pool_timeout is 30 s).
    assert max(took for _, _, took in answers) < 5
    body = next(body for _, body, _ in answers if body["status"] == expected)
    details = body["pools"]["primary"]
    assert (details["status"], details["latency_seconds"], details["used"], details["max"]) == (
        "saturated", None, 2, 2,
    )  # fmt: skip
    # Queued callers: at least one (it was saturated), at most the four of the six workers that
    # do not hold one of the pool's two connections.
    assert 1 <= details["pending"] <= 4


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_a_hundred_concurrent_probes_cost_one_checkout(
    postgres_url: str, proxy: FaultProxy, registry: CollectorRegistry, kind: str
) -> None:
    # One probe, then its answer from the cache: long enough that no answer outlives it, however
    # slowly a loaded machine serves the hundred.
    if kind == "async":
        app, _ = make_app(
            async_engine(proxied(postgres_url, proxy, "asyncpg")), registry, health_cache_seconds=60
        )
        engine = None
    else:
        engine = sa.create_engine(proxied(postgres_url, proxy, "psycopg"), pool_size=2)
        app = Starlette()
        poolwatch.instrument(app, engine, registry=registry, name="primary", health_cache_seconds=60)

    async def herd(url: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=15) as client:
            return await asyncio.gather(*(client.get("/health/db") for _ in range(100)))

    with served(app) as url:
        before = value(registry, "poolwatch_checkouts_total", pool="primary")
        responses = asyncio.run(herd(url))
        after = value(registry, "poolwatch_checkouts_total", pool="primary")
    assert [(r.status_code, r.json()) for r in responses] == [(200, {"status": "ok"})] * 100
    assert after - before == 1
    assert proxy.accepted == 1
    if engine is not None:
        engine.dispose()


def test_details_only_with_the_bearer_token(
    postgres_url: str, proxy: FaultProxy, registry: CollectorRegistry
) -> None:
    app, _ = make_app(
        async_engine(proxied(postgres_url, proxy, "asyncpg")),
        registry,
        health_details="token",
        health_token=TOKEN,
    )
    with served(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
            response = client.get("/health/db", headers=headers)
            assert (response.status_code, response.json()) == (200, {"status": "ok"})
        for scheme in ("Bearer", "bearer"):
            response = client.get("/health/db", headers={"authorization": f"{scheme} {TOKEN}"})
            assert response.status_code == 200
            body = response.json()
            assert body["status"] == "ok"
            details = body["pools"]["primary"]
            assert details["status"] == "ok"
            assert details["latency_seconds"] > 0
            assert (details["used"], details["idle"], details["max"], details["pending"]) == (
                0, 1, 2, 0,
            )  # fmt: skip


def test_details_never_and_always(postgres_url: str, proxy: FaultProxy, registry: CollectorRegistry) -> None:
    # This test is about the details, not the deadline: a generous one, so a probe that opens a
    # connection on a loaded machine (or under mutmut's trampolines) is not judged slow.
    url_ = proxied(postgres_url, proxy, "asyncpg")
    never, _ = make_app(async_engine(url_), registry, health_details="never", health_deadline_seconds=10)
    with served(never) as url, httpx.Client(base_url=url, timeout=30) as client:
        response = client.get("/health/db", headers={"authorization": f"Bearer {TOKEN}"})
        assert response.json() == {"status": "ok"}
    always, _ = make_app(
        async_engine(url_), CollectorRegistry(), health_details="always", health_deadline_seconds=10
    )
    with served(always) as url, httpx.Client(base_url=url, timeout=30) as client:
        body = client.get("/health/db").json()
    assert body["status"] == "ok"
    assert set(body["pools"]) == {"primary"}
    pool = body["pools"]["primary"]
    assert (pool["status"], pool["used"], pool["idle"], pool["max"], pool["pending"]) == ("ok", 0, 1, 2, 0)
    assert "error" not in pool and 0 < pool["latency_seconds"] < 10


# What /health/db answers in each mode of the proxy, in this order (cache 0, deadline 0.3 s): the
# pooled connection still works while new ones are refused; a stall hangs it past the deadline; after
# a cut the dead connection is replaced by a fresh one.
# A stalled server answers "degraded" (200) until the stall window (10 s by default) passes with no
# progress; this test spends far less than that in each mode.
MODES_AND_HEALTH = [("pass", 200), ("refuse", 200), ("stall", 200), ("cut", 200), ("pass", 200)]


def test_no_secret_in_any_response_or_log_event(
    postgres_url: str, proxy: FaultProxy, registry: CollectorRegistry
) -> None:
    dsn = proxied(postgres_url, proxy, "asyncpg", password=CANARY)
    seen: list[str] = []
    with structlog.testing.capture_logs() as events:
        for details in ("never", "token", "always"):
            engine = async_engine(dsn, pool_timeout=10)
            assert engine.url.password == CANARY  # the canary really travels with the engine
            app = Starlette()
            # No name=: the pool is named from the URL, the riskiest path.
            poolwatch.instrument(
                app, engine, registry=CollectorRegistry(), health_details=details,
                health_token=TOKEN if details == "token" else None,
                health_deadline_seconds=0.3, health_cache_seconds=0,
            )  # fmt: skip
            with served(app) as url, httpx.Client(base_url=url, timeout=10) as client:
                for mode, db_status in MODES_AND_HEALTH:
                    proxy.set_mode(mode)  # type: ignore[arg-type]
                    for path in ("/health/live", "/health/db", "/metrics"):
                        for headers in ({}, {"authorization": f"Bearer {TOKEN}"}):
                            response = client.get(path, headers=headers)
                            expected = db_status if path == "/health/db" else 200
                            assert response.status_code == expected, (details, mode, path, response.text)
                            seen.append(response.text + repr(response.headers.raw))
            asyncio.run(engine.dispose())
            proxy.set_mode("cut")
    assert len(seen) == 3 * 5 * 3 * 2
    assert any('"pools"' in text for text in seen)  # details were shown, and checked
    assert not [text for text in seen if CANARY in text]
    changes = [e for e in events if e["event"] == "poolwatch.health_changed"]
    assert {e["status"] for e in changes} >= {"saturated", "ok"}  # the log was captured, and checked
    assert not [event for event in events if CANARY in repr(event)]


def test_bad_input_gets_a_clean_answer(
    postgres_url: str, proxy: FaultProxy, registry: CollectorRegistry
) -> None:
    app, _ = make_app(
        async_engine(proxied(postgres_url, proxy, "asyncpg")),
        registry,
        health_details="token",
        health_token=TOKEN,
    )
    with served(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        for path in ("/health/live", "/health/db", "/metrics"):
            for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
                response = client.request(method, path)
                assert response.status_code == 405, (method, path)
                assert "GET" in response.headers["allow"]
        for query in ("?verbose=1", "?details=all&x=%ff%00", "?" + "a=b&" * 500, "?=&&="):
            response = client.get("/health/db" + query)
            assert (response.status_code, response.json()) == (200, {"status": "ok"})
            assert client.get("/health/live" + query).status_code == 200
        bad_authorizations: list[bytes] = [
            b"", b"Bearer", b"Basic dXNlcjpwYXNz", b"Bearer \xff\xfe\x80", b"Token " + TOKEN.encode(),
            b"Bearer " + TOKEN.encode() + b" extra", b"x" * 9000, b"Bearer " + b"\xc3\xa9" * 100,
            b"Bearer " + TOKEN.encode() + b" " * 9000 + b".",  # the right token, but oversized
        ]  # fmt: skip
        for authorization in bad_authorizations:
            response = client.get("/health/db", headers={"authorization": authorization})
            assert (response.status_code, response.json()) == (200, {"status": "ok"}), authorization


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_the_probes_checkouts_are_filed_under_a_route_of_their_own(
    postgres_url: str, proxy: FaultProxy, registry: CollectorRegistry, kind: str
) -> None:
    if kind == "async":
        app, _ = make_app(async_engine(proxied(postgres_url, proxy, "asyncpg")), registry)
        engine = None
    else:
        engine = sa.create_engine(proxied(postgres_url, proxy, "psycopg"), pool_size=2)
        app = Starlette()
        poolwatch.instrument(app, engine, registry=registry, name="primary")
    with served(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/health/db").json() == {"status": "ok"}
        samples = scrape(registry)
    uses = {
        labels["route"]: count
        for labels, count in samples.find("poolwatch_use_seconds_count", pool="primary")
    }
    # One checkout, by the probe, filed under the route label dashboards see, "<probe>" (spelled
    # out: the label value is the contract, not the constant); none under <none> (work outside
    # requests).
    assert uses == {"<none>": 0, "<probe>": 1}
    if engine is not None:
        engine.dispose()
