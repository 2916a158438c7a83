"""/health/db under a black-holed database: a stalled pool is down, and a hung probe never holds the
status once the database is back. Real PostgreSQL behind the fault proxy, real uvicorn."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from poolwatch._serve import probe as _probe
from poolwatch._serve.probe import probe_in_flight, probes_running
from tests.fault_fixtures import make_app, make_sync_app, proxied, proxy, served, value, wait_until
from tests.proxy import FaultProxy

__all__ = ["proxy"]  # the fixture, imported for pytest

DEADLINE = 0.5
CACHE = 1.0
# Right answers come within the deadline; wrong ones wait pool_timeout (30 s) or never come.
WELL_WITHIN = 5.0


def get(url: str, path: str) -> int:
    with httpx.Client(base_url=url, timeout=60) as client:
        return client.get(path).status_code


def timed_db(client: httpx.Client) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    response = client.get("/health/db")
    return response.status_code, response.json(), time.monotonic() - started


@pytest.mark.parametrize(
    ("kind", "pre_ping", "waiting", "saturated_status"),
    [
        ("async", False, 0, 503),
        ("async", False, 2, 200),
        ("async", True, 2, 200),
        ("sync", False, 2, 200),
    ],
    ids=["stuck-in-queries", "callers-waiting", "stuck-in-pre-ping", "sync-callers-waiting"],
)
def test_a_black_holed_database_behind_a_full_pool_is_down_not_busy(
    postgres_url: str,
    proxy: FaultProxy,
    registry: CollectorRegistry,
    kind: str,
    pre_ping: bool,
    waiting: int,
    saturated_status: int,
) -> None:
    options: dict[str, Any] = {
        "pool_size": 2, "max_overflow": 0, "pool_timeout": 30, "pool_pre_ping": pre_ping,
    }  # fmt: skip
    settings: dict[str, Any] = {
        "health_deadline_seconds": DEADLINE, "health_cache_seconds": CACHE,
        "health_saturated_status": saturated_status, "health_details": "always",
    }  # fmt: skip
    if kind == "async":
        engine = create_async_engine(proxied(postgres_url, proxy, "asyncpg"), **options)
        app, _ = make_app(engine, registry, **settings)
    else:
        app, _ = make_sync_app(
            sa.create_engine(proxied(postgres_url, proxy, "psycopg"), **options), registry, **settings
        )

    def pool_is(used: int, pending: int) -> bool:
        return (
            value(registry, "poolwatch_connections", pool="primary", state="used") == used
            and value(registry, "poolwatch_pending_requests", pool="primary") == pending
        )

    with (
        served(app) as url,
        httpx.Client(base_url=url, timeout=60) as client,
        ThreadPoolExecutor(2 + waiting) as callers,
    ):
        # Both connections opened (two requests at once), back in the pool, and the database ok.
        assert [f.result() for f in [callers.submit(get, url, "/sleep/0.2") for _ in range(2)]] == [200, 200]
        wait_until(lambda: pool_is(used=0, pending=0), 5, "the warm-up requests never finished")
        status, body, _ = timed_db(client)
        assert (status, body["status"]) == (200, "ok")
        ok_at = time.monotonic()

        proxy.set_mode("stall")
        requests = [callers.submit(get, url, "/one") for _ in range(2 + waiting)]
        # Every connection is out and stuck on the wire (in its query, or in pre-ping inside the
        # checkout), and `waiting` more callers queue behind them.
        in_connect = 2 if pre_ping else 0
        wait_until(lambda: pool_is(used=2, pending=in_connect + waiting), 10, "the pool never filled")
        # The last ok may stand for its cache period, never longer.
        time.sleep(max(0.0, ok_at + CACHE - time.monotonic()))
        answers = [timed_db(client) for _ in range(3)]
        proxy.set_mode("pass")  # held bytes are delivered: every stuck request completes
        statuses = [request.result() for request in requests]

    assert [
        (status, body["status"], body["pools"]["primary"].get("error")) for status, body, _ in answers
    ] == [(503, "down", "stalled")] * 3
    assert max(took for _, _, took in answers) < WELL_WITHIN
    assert statuses == [200] * (2 + waiting)


def test_recovery_shows_within_one_cache_period_while_a_sync_probe_hangs_in_connect(
    postgres_url: str, proxy: FaultProxy, registry: CollectorRegistry
) -> None:
    # No connect_timeout: psycopg's own default (130 s) keeps the probe's attempt hanging for the
    # whole test, as libpq-style defaults do for minutes to hours in production.
    engine = sa.create_engine(
        proxied(postgres_url, proxy, "psycopg"), pool_size=2, max_overflow=0, pool_timeout=30
    )
    app, watch = make_sync_app(engine, registry, health_deadline_seconds=DEADLINE, health_cache_seconds=CACHE)
    [recorder] = watch.recorders
    with served(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        proxy.set_mode("stall")
        status, body, took = timed_db(client)
        assert (status, body, took < WELL_WITHIN) == (503, {"status": "down"}, True)
        assert probe_in_flight(recorder)  # its thread is stuck opening a connection

        # The database is back (the hung attempt's socket stays black-holed) and the
        # application's own requests succeed.
        proxy.set_mode("pass")
        assert client.get("/one").status_code == 200
        # Within a cache period and a deadline; behind the hung probe it would take psycopg's
        # connect timeout (130 s).
        wait_until(
            lambda: client.get("/health/db").status_code == 200,
            WELL_WITHIN,
            "/health/db stayed down behind the hung probe",
        )
        # The hung probe still runs; a fresh one answered beside it.
        assert probes_running(recorder) == 1
    proxy.stop()  # the black-holed socket closes, and the hung thread gets its error
    wait_until(lambda: not probe_in_flight(recorder), 10, "the hung probe never returned")


def probe_threads(name: str) -> int:
    return sum(1 for thread in threading.enumerate() if thread.name == f"poolwatch-probe-{name}")


def test_hung_sync_probes_stay_bounded_while_the_database_flaps(
    postgres_url: str, proxy: FaultProxy, registry: CollectorRegistry
) -> None:
    # NullPool opens a connection per checkout, so a probe during each stall hangs connecting.
    engine = sa.create_engine(proxied(postgres_url, proxy, "psycopg"), poolclass=NullPool)
    app, watch = make_sync_app(engine, registry, health_deadline_seconds=0.3, health_cache_seconds=0)
    [recorder] = watch.recorders
    threads_before = probe_threads(recorder.name)
    running = []
    with served(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(6):
            proxy.set_mode("stall")
            assert client.get("/health/db").json() == {"status": "down"}
            running.append(probes_running(recorder))
            # Back for a moment: the application gets through (a sign of life), then it stalls again.
            proxy.set_mode("pass")
            assert client.get("/one").status_code == 200
        hung_threads = probe_threads(recorder.name) - threads_before
    # A fresh probe after each sign of life, never more than _MAX_RUNNING of them alive.
    assert running == [1, 2, 3, 3, 3, 3]
    assert hung_threads == _probe._MAX_RUNNING == 3
    proxy.stop()
    wait_until(lambda: not probe_in_flight(recorder), 10, "the hung probes never returned")


def test_without_traffic_a_hung_probe_gets_one_companion_by_age_and_keeps_a_slot_for_life(
    postgres_url: str, proxy: FaultProxy, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_probe, "_HUNG_RETRY_SECONDS", 1.0)
    engine = sa.create_engine(proxied(postgres_url, proxy, "psycopg"), pool_size=5, pool_timeout=30)
    app, watch = make_sync_app(engine, registry, health_deadline_seconds=0.3, health_cache_seconds=0)
    [recorder] = watch.recorders
    with served(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        proxy.set_mode("stall")
        answers = set()
        # Four retry periods of readiness checks with no traffic at all.
        until = time.monotonic() + 4.0
        while time.monotonic() < until:
            answers.add(client.get("/health/db").status_code)
            time.sleep(0.1)
        assert answers == {503}
        # One more attempt by age; the last slot is kept for a sign of life.
        assert probes_running(recorder) == 2
        assert proxy.accepted == 2
        proxy.set_mode("pass")
        assert client.get("/one").status_code == 200
        assert client.get("/health/db").json() == {"status": "ok"}
        assert probes_running(recorder) == 2
    proxy.stop()
    wait_until(lambda: not probe_in_flight(recorder), 10, "the hung probes never returned")
