"""Sidecar mode: with metrics_port set, metrics and health live on that port only."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import poolwatch
from tests.fault_fixtures import SERVINGS, Serving, sync_client_of
from tests.metrics import parse_text
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOLWATCH_METRICS_HOST", "127.0.0.1")


@pytest.mark.parametrize("serving", SERVINGS)
def test_metrics_and_health_on_the_metrics_port_only(
    sync_url: str, registry: CollectorRegistry, serving: Serving
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0)

    def query(request: object) -> PlainTextResponse:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/query", query)])
    port = free_port()
    watch = poolwatch.instrument(
        app, engine, registry=registry, name="side", metrics_port=port, health_deadline_seconds=20
    )
    try:
        with sync_client_of(app, serving) as client:
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
            db = httpx.get(f"{base}/health/db", timeout=30)
            assert (db.status_code, db.json()) == (200, {"status": "ok"})
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
    port = free_port()
    watch = poolwatch.watch(
        engine, registry=registry, name="script", metrics_port=port, health_details="always",
        health_deadline_seconds=20,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/metrics", timeout=5).status_code == 200
        assert httpx.get(f"{base}/health/live", timeout=5).status_code == 200
        assert httpx.get(f"{base}/nothing", timeout=5).status_code == 404
        # A sync engine's connections belong to no loop: it is probed from the server thread.
        db = httpx.get(f"{base}/health/db", timeout=30)
        assert (db.status_code, db.json()["status"]) == (200, "ok")
        pool = db.json()["pools"]["script"]
        assert pool["latency_seconds"] is not None and "probe" not in pool, pool
    finally:
        watch.close()
        engine.dispose()


def test_once_the_loop_that_called_watch_has_ended_async_pools_are_not_probed(
    async_url: str, registry: CollectorRegistry
) -> None:
    engine = create_async_engine(async_url, pool_size=2, max_overflow=0)
    port = free_port()

    async def start() -> poolwatch.PoolWatch:
        watch = poolwatch.watch(
            engine, registry=registry, name="ended", metrics_port=port, health_details="always",
            health_deadline_seconds=20,
        )  # fmt: skip
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))
        return watch

    watch = asyncio.run(start())  # the pool keeps an idle connection of a loop now closed
    try:
        db = httpx.get(f"http://127.0.0.1:{port}/health/db", timeout=30)
        assert (db.status_code, db.json()["status"]) == (200, "ok")
        pool = db.json()["pools"]["ended"]
        assert pool["probe"].startswith("skipped") and (pool["used"], pool["idle"]) == (0, 1), pool
    finally:
        watch.close()
        engine.sync_engine.dispose(close=False)  # its connections' loop is gone


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


# -- an async worker without an ASGI app ------------------------------------------------------------

# A worker process: four tasks run statements on a watched AsyncEngine until told to stop (a line on
# stdin), then print what happened as JSON. ``watch()`` is called inside the running loop or, with
# "outside", at import time before ``asyncio.run``. A crash or a hang in the worker fails the test
# (its exit status, or the wait for its report), instead of taking pytest down with it.
WORKER = """
import asyncio
import json
import sys
from collections import Counter

import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import create_async_engine

import poolwatch

url, port, where = sys.argv[1], int(sys.argv[2]), sys.argv[3]
engine = create_async_engine(url, pool_size=TASKS + 1, max_overflow=0)
settings = dict(
    registry=CollectorRegistry(), name="worker", metrics_port=port, leak_threshold_seconds=0,
    health_details="always", health_cache_seconds=0, health_deadline_seconds=20,
)
watch = poolwatch.watch(engine, **settings) if where == "outside" else None


async def main():
    global watch
    if watch is None:
        watch = poolwatch.watch(engine, **settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), stop.set)
    done, failures = 0, Counter()

    async def work():
        nonlocal done
        while not stop.is_set():
            try:
                async with engine.begin() as connection:
                    await connection.execute(sa.text("SELECT pg_sleep(0.002)"))
                    await connection.execute(sa.text("SELECT 1"))
                done += 1
            except Exception as error:
                failures[f"{type(error).__name__}: {error}"[:200]] += 1
            await asyncio.sleep(0)

    print("ready", flush=True)
    await asyncio.wait_for(asyncio.gather(*(work() for _ in range(TASKS))), 300)
    await engine.dispose()
    watch.close()
    print(json.dumps({"done": done, "failures": dict(failures)}), flush=True)


asyncio.run(main())
""".replace("TASKS", "4")
HAMMERS = 300


def _hammer(base: str, rounds: int) -> list[tuple[str, int, dict[str, Any] | None]]:
    """/health/db and /metrics from four threads at once, ``rounds`` requests of each."""

    def one(index: int) -> tuple[str, int, dict[str, Any] | None]:
        path = "/health/db" if index % 2 == 0 else "/metrics"
        try:
            response = httpx.get(f"{base}{path}", timeout=60)
        except httpx.HTTPError as error:  # the worker died: its exit status tells the story
            return path, -1, {"error": repr(error)}
        return path, response.status_code, response.json() if path == "/health/db" else None

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, range(2 * rounds)))


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_an_async_worker_is_never_disturbed_by_the_sidecar(
    async_url: str, tmp_path: Path, where: str
) -> None:
    """watch(async_engine, metrics_port=...) in a worker with no ASGI app: its connections belong to
    the worker's loop, so the sidecar must never use them from its own thread or loop."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "POOLWATCH_METRICS_HOST": "127.0.0.1"}
    worker = subprocess.Popen(
        [sys.executable, str(script), async_url, str(port), where],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )  # fmt: skip
    try:
        assert worker.stdout is not None and worker.stdin is not None
        assert worker.stdout.readline().strip() == "ready", worker.stderr.read()  # type: ignore[union-attr]
        answers = _hammer(f"http://127.0.0.1:{port}", HAMMERS)
        worker.stdin.write("stop\n")
        worker.stdin.flush()
        out, err = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    assert worker.returncode == 0, f"worker exited with {worker.returncode}:\n{err[-3000:]}"
    report = json.loads(out.strip().splitlines()[-1])
    assert report["failures"] == {}, report
    assert report["done"] > 0
    assert all(status == 200 for path, status, _ in answers if path == "/metrics")
    health = [(status, body) for path, status, body in answers if path == "/health/db"]
    assert len(health) == HAMMERS
    probed = 0
    for status, body in health:
        assert body is not None
        assert (status, body["status"]) == (200, "ok"), body
        pool = body["pools"]["worker"]
        if where == "inside":
            # Probed for real, on the worker's own loop (cache 0: every request probes), unless
            # every slot was taken as the check began: a full pool is judged by its progress instead
            # (the details show the pool as it is after the check).
            assert "probe" not in pool, pool
            probed += pool["latency_seconds"] is not None
        else:
            # No loop owns the engine's connections as far as poolwatch knows: pool state only.
            assert pool["latency_seconds"] is None, pool
            assert pool["probe"].startswith("skipped"), pool
    if where == "inside":
        assert probed > 0, "no /health/db answer was probed on the worker's loop"
