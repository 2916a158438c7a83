"""Installing poolwatch: the one-line forms, /metrics over HTTP, bad input, and failure isolation."""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from sqlalchemy.ext.asyncio import create_async_engine

import poolwatch
from poolwatch import PoolWatchMiddleware
from tests.metrics import parse_text, scrape

REPO = Path(__file__).resolve().parent.parent


def small_app(engine: sa.Engine | object) -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, int]:
        async with engine.connect() as connection:  # type: ignore[attr-defined]
            return {"one": (await connection.execute(sa.text("SELECT 1"))).scalar_one()}

    return app


async def get(app: FastAPI, path: str, **headers: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path, headers=headers)


async def test_add_middleware_form_serves_metrics(async_url: str, registry: CollectorRegistry) -> None:
    engine = create_async_engine(async_url, pool_size=2)
    app = small_app(engine)
    app.add_middleware(PoolWatchMiddleware, engines=[engine], registry=registry, name="mw")
    assert (await get(app, "/ping")).json() == {"one": 1}
    response = await get(app, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = parse_text(response.text)
    assert samples.value("poolwatch_checkouts_total", pool="mw") == 1
    assert samples.value("poolwatch_request_queries_count", route="/ping") == 1
    await engine.dispose()


async def test_metrics_in_openmetrics_and_gzip(async_url: str, registry: CollectorRegistry) -> None:
    engine = create_async_engine(async_url, pool_size=2)
    app = small_app(engine)
    poolwatch.instrument(app, engine, registry=registry, name="om")
    await get(app, "/ping")
    response = await get(app, "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    families = {family.name: family for family in parse_om(response.text)}
    assert "poolwatch_checkouts" in families and "poolwatch_wait_seconds" in families
    assert all(s.value >= 0 for family in families.values() for s in family.samples)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        raw = await client.get("/metrics", headers={"accept-encoding": "gzip"})
        assert raw.headers["content-encoding"] == "gzip"
        # httpx already decoded it; the body on the wire was gzip.
        assert gzip.decompress(gzip.compress(raw.content)).startswith(b"# HELP")
        assert (await client.post("/metrics")).status_code == 405
        assert (await client.head("/metrics")).status_code == 200
    await engine.dispose()


async def test_a_failure_inside_poolwatch_never_reaches_the_app(
    async_url: str, registry: CollectorRegistry
) -> None:
    engine = create_async_engine(async_url, pool_size=2)
    app = small_app(engine)
    watch = poolwatch.instrument(app, engine, registry=registry, name="faulty")
    [recorder] = watch.recorders
    before = scrape(registry).value("poolwatch_internal_errors_total")

    # Break the recorder's own table of statement histograms: every statement's bookkeeping now
    # fails inside poolwatch; the hook must swallow it, count it and carry on.
    recorder.query.clear()
    for _ in range(3):
        response = await get(app, "/ping")
        assert response.status_code == 200 and response.json() == {"one": 1}
    after = scrape(registry).value("poolwatch_internal_errors_total")
    assert after >= before + 3
    assert scrape(registry).value("poolwatch_connections", pool="faulty", state="used") == 0
    await engine.dispose()


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"leak_threshold_seconds": -1}, "leak_threshold_seconds"),
        ({"slow_query_seconds": "soon"}, "slow_query_seconds"),
        ({"health_deadline_seconds": 0}, "health_deadline_seconds"),
        ({"metrics_path": "metrics"}, "metrics_path"),
        ({"health_details": "sometimes"}, "health_details"),
        ({"metrics_port": 70000}, "metrics_port"),
        ({"leak_treshold_seconds": 5}, "leak_treshold_seconds"),
    ],
)
def test_bad_settings_fail_at_once_naming_the_setting(
    sync_url: str, settings: dict[str, object], named: str
) -> None:
    engine = sa.create_engine(sync_url)
    with pytest.raises(ValueError, match=named):
        poolwatch.watch(engine, registry=CollectorRegistry(), **settings)
    engine.dispose()


def test_bad_environment_fails_naming_the_variable(
    sync_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POOLWATCH_LEAK_THRESHOLD_SECONDS", "-3")
    engine = sa.create_engine(sync_url)
    with pytest.raises(ValueError, match="POOLWATCH_LEAK_THRESHOLD_SECONDS"):
        poolwatch.watch(engine, registry=CollectorRegistry())
    monkeypatch.setenv("POOLWATCH_LEAK_THRESHOLD_SECONDS", "5")
    watch = poolwatch.watch(engine, registry=CollectorRegistry(), name="env")
    assert watch.settings.leak_threshold_seconds == 5
    assert poolwatch.PoolWatchSettings(leak_threshold_seconds=7).leak_threshold_seconds == 7
    engine.dispose()


@pytest.mark.parametrize("not_an_engine", ["postgresql://x@y/z", 42, None, object()])
def test_something_that_is_not_an_engine_is_refused(not_an_engine: object) -> None:
    with pytest.raises(TypeError, match="Engine or AsyncEngine"):
        poolwatch.watch(not_an_engine, registry=CollectorRegistry())
    with pytest.raises(TypeError, match="Engine or AsyncEngine"):
        poolwatch.instrument(FastAPI(), {"primary": not_an_engine}, registry=CollectorRegistry())


def test_engines_that_would_share_a_name_must_be_named(sync_url: str) -> None:
    first, second = sa.create_engine(sync_url), sa.create_engine(sync_url)
    with pytest.raises(ValueError, match="name them"):
        poolwatch.watch(first, second, registry=CollectorRegistry())
    watch = poolwatch.watch({"a": first, "b": second}, registry=CollectorRegistry())
    assert watch.pool_names == ["a", "b"]
    first.dispose()
    second.dispose()


def test_pool_name_never_carries_credentials() -> None:
    engine = sa.create_engine("postgresql+psycopg://alice:s3cret-canary@db.internal:6543/shop")
    watch = poolwatch.watch(engine, registry=CollectorRegistry())
    assert watch.pool_names == ["db.internal:6543/shop"]
    assert "canary" not in repr(watch) and "alice" not in repr(watch)
    named = sa.create_engine("postgresql+psycopg://u@h/db", pool_logging_name="orders")
    assert poolwatch.watch(named, registry=CollectorRegistry()).pool_names == ["orders"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_demo_command_starts_without_database_url(tmp_path: Path) -> None:
    """README's demo command on an embedded database: serves the API, /metrics and health."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    process = subprocess.Popen(
        [sys.executable, "-m", "demo_app", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health/live", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        email = f"demo-{time.time_ns()}@example.com"
        created = httpx.post(f"{base}/users", json={"email": email, "name": "Demo"}, timeout=5)
        assert created.status_code == 201, created.text
        user_id = created.json()["id"]
        assert httpx.get(f"{base}/users/{user_id}", timeout=5).json()["email"] == email
        post = httpx.post(f"{base}/users/{user_id}/posts", json={"title": "t"}, timeout=5)
        assert post.status_code == 201
        listing = httpx.get(f"{base}/users/{user_id}/posts?limit=1", timeout=5).json()
        assert listing["total"] == 1 and listing["limit"] == 1
        assert httpx.delete(f"{base}/users/{user_id}", timeout=5).status_code == 204
        assert httpx.get(f"{base}/users/{user_id}", timeout=5).status_code == 404
        samples = parse_text(httpx.get(f"{base}/metrics", timeout=5).text)
        assert samples.value("poolwatch_checkouts_total", pool="primary") >= 5
        assert samples.value("poolwatch_use_seconds_count", pool="primary", route="/users/{user_id}") >= 2
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
    assert b"Traceback" not in output, output.decode(errors="replace")
