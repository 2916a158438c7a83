"""Sidecar mode: with metrics_port set, metrics and health live on that port only."""

from __future__ import annotations

import socket

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import poolwatch
from tests.metrics import parse_text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOLWATCH_METRICS_HOST", "127.0.0.1")


def test_metrics_and_health_on_the_metrics_port_only(sync_url: str, registry: CollectorRegistry) -> None:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0)

    def query(request: object) -> PlainTextResponse:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/query", query)])
    port = _free_port()
    watch = poolwatch.instrument(app, engine, registry=registry, name="side", metrics_port=port)
    try:
        with TestClient(app) as client:
            assert client.get("/query").status_code == 200
            for path in ("/metrics", "/health/live", "/health/db"):
                assert client.get(path).status_code == 404, path

            base = f"http://127.0.0.1:{port}"
            metrics = httpx.get(f"{base}/metrics", timeout=5)
            assert metrics.status_code == 200
            samples = parse_text(metrics.text)
            assert samples.value("poolwatch_checkouts_total", pool="side") == 1  # type: ignore[attr-defined]

            openmetrics = httpx.get(
                f"{base}/metrics", headers={"Accept": "application/openmetrics-text"}, timeout=5
            )
            assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
            assert openmetrics.text.rstrip().endswith("# EOF")

            # Health runs on the app's event loop (the middleware saw it during lifespan).
            assert watch.app_loop is not None
            live = httpx.get(f"{base}/health/live", timeout=5)
            assert live.status_code == 200
            assert live.json()["status"] == "ok"
            db = httpx.get(f"{base}/health/db", timeout=5)
            assert db.status_code in (200, 503)
            assert db.json()["status"] in ("ok", "down", "saturated")
            assert httpx.get(f"{base}/query", timeout=5).status_code == 404
    finally:
        watch.close()
        engine.dispose()
    # close() stops the server and frees the port.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_watch_without_an_app_serves_health_on_its_own_loop(
    sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0)
    port = _free_port()
    watch = poolwatch.watch(engine, registry=registry, name="script", metrics_port=port)
    try:
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/metrics", timeout=5).status_code == 200
        assert httpx.get(f"{base}/health/live", timeout=5).status_code == 200
        assert httpx.get(f"{base}/nothing", timeout=5).status_code == 404
    finally:
        watch.close()
        engine.dispose()


def test_a_port_in_use_fails_at_start_up_naming_the_setting(
    sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="metrics_port"):
            poolwatch.watch(engine, registry=registry, name="busy", metrics_port=port)
    engine.dispose()
