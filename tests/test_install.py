"""Installing poolwatch: the one-line forms, /metrics over HTTP, bad input, and failure isolation."""

from __future__ import annotations

import gzip
import os
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
from poolwatch._serve import exposition
from tests.fault_fixtures import SERVINGS, Serving, client_of, wait_until_async
from tests.metrics import parse_text, scrape
from tests.ports import free_port

REPO = Path(__file__).resolve().parent.parent


def small_app(engine: sa.Engine | object) -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, int]:
        async with engine.connect() as connection:  # type: ignore[attr-defined]
            return {"one": (await connection.execute(sa.text("SELECT 1"))).scalar_one()}

    return app


@pytest.mark.parametrize("serving", SERVINGS)
async def test_add_middleware_form_serves_metrics(
    async_url: str, registry: CollectorRegistry, serving: Serving
) -> None:
    engine = create_async_engine(async_url, pool_size=2)
    app = small_app(engine)
    app.add_middleware(PoolWatchMiddleware, engines=[engine], registry=registry, name="mw")
    async with client_of(app, serving) as client:
        assert (await client.get("/ping")).json() == {"one": 1}
        await returned(registry, "mw")
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = parse_text(response.text)
    assert samples.value("poolwatch_checkouts_total", pool="mw") == 1
    assert samples.value("poolwatch_request_queries_count", route="/ping", method="GET") == 1
    await engine.dispose()


@pytest.mark.parametrize("compressor", ["zlib", "isal"])
@pytest.mark.parametrize("serving", SERVINGS)
async def test_metrics_in_openmetrics_and_gzip(
    async_url: str,
    registry: CollectorRegistry,
    serving: Serving,
    compressor: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Both ways a body is gzipped: the stdlib's, and ISA-L's when the speedups extra is installed
    # (the test environment installs it: a missing isal fails here rather than going untested).
    if compressor == "isal":
        assert exposition.compress_body is exposition._isal_gzip, "poolwatch[speedups] not installed"
    else:
        monkeypatch.setattr(exposition, "compress_body", exposition._stdlib_gzip)
    engine = create_async_engine(async_url, pool_size=2)
    app = small_app(engine)
    poolwatch.instrument(app, engine, registry=registry, name="om")
    async with client_of(app, serving) as client:
        await client.get("/ping")
        await returned(registry, "om")
        response = await client.get(
            "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
        )
        assert response.headers["content-type"].startswith("application/openmetrics-text")
        families = {family.name: family for family in parse_om(response.text)}
        plain = parse_text((await client.get("/metrics", headers={"accept-encoding": "identity"})).text)
        # The bytes as they came over the wire, undecoded: they must be gzip, of the same exposition.
        async with client.stream("GET", "/metrics", headers={"accept-encoding": "gzip"}) as raw:
            assert raw.headers["content-encoding"] == "gzip"
            wire = b"".join([chunk async for chunk in raw.aiter_raw()])
        assert (await client.post("/metrics")).status_code == 405
        head = await client.head("/metrics")
        assert (head.status_code, head.content) == (200, b"")
    assert families["poolwatch_checkouts"].samples[0].value == 1
    assert families["poolwatch_wait_seconds"].type == "histogram"
    assert plain.value("poolwatch_checkouts_total", pool="om") == 1
    unzipped = parse_text(gzip.decompress(wire).decode())
    # The same samples as the plain text (scrape-time gauges aside, none of which moved).
    assert unzipped == plain
    await engine.dispose()


@pytest.mark.parametrize("serving", SERVINGS)
async def test_a_failure_inside_poolwatch_never_reaches_the_app(
    async_url: str, registry: CollectorRegistry, serving: Serving
) -> None:
    engine = create_async_engine(async_url, pool_size=2)
    app = small_app(engine)
    watch = poolwatch.instrument(app, engine, registry=registry, name="faulty")
    [recorder] = watch.recorders
    async with client_of(app, serving) as client:
        assert (await client.get("/ping")).json() == {"one": 1}  # the dialect's first connect, first
        await returned(registry, "faulty")
        before = scrape(registry).value("poolwatch_internal_errors_total")

        # Break the recorder's own table of statement histograms: every statement's bookkeeping now
        # fails inside poolwatch; the hook must swallow it, count it and carry on.
        recorder.query.clear()
        for _ in range(3):
            response = await client.get("/ping")
            assert (response.status_code, response.json()) == (200, {"one": 1})
        await returned(registry, "faulty")
    # One swallowed failure per statement: three requests, one SELECT each.
    assert scrape(registry).value("poolwatch_internal_errors_total") == before + 3
    await engine.dispose()


async def returned(registry: CollectorRegistry, pool: str) -> None:
    """Wait until ``pool`` has no connection out: under a server the response reaches the client
    before the app has returned its connection."""
    await wait_until_async(
        lambda: scrape(registry).value("poolwatch_connections", pool=pool, state="used") == 0,
        10,
        f"{pool} never got its connection back",
    )


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


def test_bad_environment_fails_naming_the_variable(sync_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
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


def test_demo_command_starts_without_database_url(tmp_path: Path) -> None:
    """README's demo command on an embedded database: serves the API, /metrics and health."""
    port = free_port()
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
        assert (
            samples.value(
                "poolwatch_use_seconds_count", pool="primary", route="/users/{user_id}", method="GET"
            )
            >= 2
        )
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
    assert b"Traceback" not in output, output.decode(errors="replace")


def test_watching_a_sync_engine_imports_no_web_framework_or_asyncio_extension() -> None:
    # The borrow site finds FastAPI's, uvicorn's and anyio's directories without importing them,
    # and a sync engine needs no sqlalchemy.ext.asyncio: a worker or script pays for neither.
    code = (
        "import sys, sqlalchemy as sa, poolwatch\n"
        "engine = sa.create_engine('sqlite://')\n"
        "watch = poolwatch.watch(engine)\n"
        "with engine.connect() as connection:\n"
        "    connection.exec_driver_sql('SELECT 1')\n"
        "assert watch.recorders[0].checkouts == 1\n"
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'sqlalchemy.ext.asyncio') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
