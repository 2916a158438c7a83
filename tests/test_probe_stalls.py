"""/health/db under a black-holed database: a full pool that makes no progress for the stall window
is down (never sooner: a slow database is not a dead one), a black hole is never "ok" after a cache
period, and a hung probe never holds the status once the database is back. Real PostgreSQL behind
the fault proxy, real uvicorn."""

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
# Short for the tests; the default is 10 s.
STALL = 2.0
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
    ("kind", "pre_ping", "waiting"),
    [("async", False, 2), ("async", True, 2), ("sync", False, 2)],
    ids=["callers-waiting", "stuck-in-pre-ping", "sync-callers-waiting"],
)
def test_a_black_holed_database_behind_a_full_pool_is_down_after_the_stall_window(
    postgres_url: str,
    proxy: FaultProxy,
    registry: CollectorRegistry,
    kind: str,
    pre_ping: bool,
    waiting: int,
) -> None:
    options: dict[str, Any] = {
        "pool_size": 2, "max_overflow": 0, "pool_timeout": 30, "pool_pre_ping": pre_ping,
    }  # fmt: skip
    settings: dict[str, Any] = {
        "health_deadline_seconds": DEADLINE, "health_cache_seconds": CACHE,
        "health_stall_seconds": STALL, "health_details": "always",
        # Not about the server's limit: its background read would hold a slot when the link dies.
        "server_connections_max": "off",
    }  # fmt: skip
    if kind == "async":
        engine = create_async_engine(proxied(postgres_url, proxy, "asyncpg"), **options)
        app, _ = make_app(engine, registry, **settings)
    else:
        app, _ = make_sync_app(
            sa.create_engine(proxied(postgres_url, proxy, "psycopg"), **options), registry, **settings
        )

    def pool_is(out: int, pending: int) -> bool:
        # Callers stuck in pre-ping hold a slot but have no connection yet: not "used", not pending.
        used = value(registry, "poolwatch_connections", pool="primary", state="used")
        pinging = value(registry, "poolwatch_connections_pinging", pool="primary")
        queued = value(registry, "poolwatch_pending_requests", pool="primary")
        return (used + pinging, queued) == (out, pending)

    with (
        served(app) as url,
        httpx.Client(base_url=url, timeout=60) as client,
        ThreadPoolExecutor(2 + waiting) as callers,
    ):
        # Both connections opened (two requests at once), back in the pool, and the database ok.
        assert [f.result() for f in [callers.submit(get, url, "/sleep/0.2") for _ in range(2)]] == [200, 200]
        wait_until(lambda: pool_is(out=0, pending=0), 5, "the warm-up requests never finished")
        status, body, _ = timed_db(client)
        assert (status, body["status"]) == (200, "ok")

        proxy.set_mode("stall")
        stalled_at = time.monotonic()
        requests = [callers.submit(get, url, "/one") for _ in range(2 + waiting)]
        # Every connection is out and stuck on the wire (in its query, or in pre-ping inside the
        # checkout), and `waiting` more callers queue behind them.
        wait_until(lambda: pool_is(out=2, pending=waiting), 10, "the pool never filled")
        answers: list[tuple[float, int, str, str | None, float]] = []
        while time.monotonic() < stalled_at + STALL + CACHE + WELL_WITHIN:
            status, body, took = timed_db(client)
            answers.append(
                (time.monotonic(), status, body["status"], body["pools"]["primary"].get("error"), took)
            )
            if body["status"] == "down":
                break
            time.sleep(0.1)
        proxy.set_mode("pass")  # held bytes are delivered: every stuck request completes
        statuses = [request.result() for request in requests]

    shown = [(status, word, error) for _, status, word, error, _ in answers]
    # Saturated (200 "degraded", the default) while the stall window runs, then down: never "ok".
    assert shown[-1] == (503, "down", "stalled"), shown
    assert set(shown[:-1]) == {(200, "degraded", None)}, shown
    # Down only once the window has passed with no progress, never on the probe's deadline.
    assert answers[-1][0] - stalled_at >= STALL
    assert max(took for *_, took in answers) < WELL_WITHIN
    assert statuses == [200] * (2 + waiting)


def test_a_full_pool_stuck_in_queries_with_nobody_waiting_is_saturated_not_ok_and_not_down(
    postgres_url: str, proxy: FaultProxy, registry: CollectorRegistry
) -> None:
    """Every connection out, nothing moving, nobody queued: as far as the pool can tell, that is
    two long statements as much as a dead server, so it is "saturated" (never "ok" after the
    cache period, never "down": nobody is waiting on the pool)."""
    engine = create_async_engine(proxied(postgres_url, proxy, "asyncpg"), pool_size=2, max_overflow=0)
    app, _ = make_app(
        engine, registry, health_deadline_seconds=DEADLINE, health_cache_seconds=CACHE,
        health_stall_seconds=STALL, health_saturated_status=503, health_details="always",
        server_connections_max="off",
    )  # fmt: skip
    with (
        served(app) as url,
        httpx.Client(base_url=url, timeout=60) as client,
        ThreadPoolExecutor(2) as callers,
    ):
        # Both connections opened and back in the pool, so the stalled requests hold them.
        assert [f.result() for f in [callers.submit(get, url, "/sleep/0.2") for _ in range(2)]] == [200, 200]
        assert client.get("/health/db").json()["status"] == "ok"
        ok_at = time.monotonic()
        proxy.set_mode("stall")
        requests = [callers.submit(get, url, "/one") for _ in range(2)]
        wait_until(
            lambda: value(registry, "poolwatch_connections", pool="primary", state="used") == 2,
            10,
            "the pool never filled",
        )
        time.sleep(max(0.0, ok_at + CACHE - time.monotonic()))
        shown = set()
        until = time.monotonic() + STALL + CACHE + 1.0
        while time.monotonic() < until:
            response = client.get("/health/db")
            shown.add((response.status_code, response.json()["pools"]["primary"]["status"]))
            time.sleep(0.1)
        proxy.set_mode("pass")
        assert [request.result() for request in requests] == [200, 200]
    assert shown == {(503, "saturated")}


def test_a_slow_but_alive_database_behind_a_full_pool_is_never_down(
    async_url: str, registry: CollectorRegistry
) -> None:
    """Two-second statements through a full pool of 2 with six callers queued, probed for 15 s with
    a stall window shorter than a statement: statements keep completing, so it is saturated
    (200 "degraded") throughout, never "down". The old verdict said "stalled" in 4 of 6 probes."""
    engine = create_async_engine(async_url, pool_size=2, max_overflow=0, pool_timeout=60)
    app, _ = make_app(
        engine, registry, health_deadline_seconds=DEADLINE, health_cache_seconds=CACHE,
        health_stall_seconds=3.0, health_details="always",
    )  # fmt: skip
    with (
        served(app) as url,
        httpx.Client(base_url=url, timeout=60) as client,
        ThreadPoolExecutor(8) as callers,
    ):
        requests = [callers.submit(get, url, "/sleep/2") for _ in range(8)]
        wait_until(
            lambda: value(registry, "poolwatch_pending_requests", pool="primary") == 6, 10, "six never queued"
        )
        shown = []
        until = time.monotonic() + 15.0
        while time.monotonic() < until and not all(request.done() for request in requests):
            response = client.get("/health/db")
            details = response.json()["pools"]["primary"]
            shown.append((response.status_code, response.json()["status"], details["pending"] > 0))
            time.sleep(0.5)
        assert [request.result() for request in requests] == [200] * 8
    # Every answer while callers queued was "degraded"; none was "down".
    assert [answer for answer in shown if answer[2]], "nothing was probed while callers queued"
    assert {answer[:2] for answer in shown if answer[2]} == {(200, "degraded")}
    assert not [answer for answer in shown if answer[1] == "down"]


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
        # Late, not dead, until the stall window (10 s) passes with no progress: "degraded".
        assert (status, body, took < WELL_WITHIN) == (200, {"status": "degraded"}, True)
        assert probe_in_flight(recorder)  # its thread is stuck opening a connection

        # The database is back (the hung attempt's socket stays black-holed) and the
        # application's own requests succeed.
        proxy.set_mode("pass")
        assert client.get("/one").status_code == 200
        # Within a cache period and a deadline; behind the hung probe it would take psycopg's
        # connect timeout (130 s).
        wait_until(
            lambda: client.get("/health/db").json() == {"status": "ok"},
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
    app, watch = make_sync_app(
        engine, registry, health_deadline_seconds=0.3, health_cache_seconds=0, health_stall_seconds=600
    )
    [recorder] = watch.recorders
    threads_before = probe_threads(recorder.name)
    running = []
    with served(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(6):
            proxy.set_mode("stall")
            # Late, not dead: the application got through a moment ago (the stall window is long).
            assert client.get("/health/db").json() == {"status": "degraded"}
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
    app, watch = make_sync_app(
        engine, registry, health_deadline_seconds=0.3, health_cache_seconds=0, health_stall_seconds=0.5
    )
    [recorder] = watch.recorders
    with served(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        proxy.set_mode("stall")
        answers = set()
        # Four retry periods of readiness checks with no traffic at all.
        until = time.monotonic() + 4.0
        while time.monotonic() < until:
            answers.add(client.get("/health/db").status_code)
            time.sleep(0.1)
        # No traffic and no answer: degraded until the stall window passes, then down.
        assert answers == {200, 503}
        assert client.get("/health/db").status_code == 503
        # One more attempt by age; the last slot is kept for a sign of life.
        assert probes_running(recorder) == 2
        assert proxy.accepted == 2
        proxy.set_mode("pass")
        assert client.get("/one").status_code == 200
        assert client.get("/health/db").json() == {"status": "ok"}
        assert probes_running(recorder) == 2
    proxy.stop()
    wait_until(lambda: not probe_in_flight(recorder), 10, "the hung probes never returned")
