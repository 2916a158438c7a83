"""/health/db and the app under injected faults: refuse, stall, cut, pg_terminate_backend."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette

import poolwatch
from demo_app.main import create_app
from demo_app.settings import DemoSettings
from poolwatch._serve.health import HealthEndpoints
from poolwatch._serve.probe import probe_in_flight
from tests.fault_fixtures import (
    call,
    make_app,
    proxied,
    proxy,
    served,
    total,
    value,
    wait_until,
    wait_until_async,
)
from tests.metrics import scrape
from tests.proxy import FaultProxy

__all__ = ["proxy"]  # the fixture, imported for pytest

DEADLINE = 0.5
CACHE = 1.0
# A right answer comes within the deadline; a probe that ignores it waits pool_timeout (30 s here)
# or a connect that never returns. A bound far from both.
WELL_WITHIN = 5.0


def get_db(client: httpx.Client) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = client.get("/health/db")
    return response, time.monotonic() - started


def test_pass_refuse_stall_and_back(
    postgres_url: str, proxy: FaultProxy, registry: CollectorRegistry
) -> None:
    engine = create_async_engine(
        proxied(postgres_url, proxy, "asyncpg"), pool_size=2, max_overflow=0, pool_timeout=30
    )
    app, watch = make_app(engine, registry, health_deadline_seconds=DEADLINE, health_cache_seconds=CACHE)
    [recorder] = watch.recorders
    with served(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        response, _ = get_db(client)
        assert (response.status_code, response.json()) == (200, {"status": "ok"})
        assert value(registry, "poolwatch_connections", pool="primary", state="idle") == 1

        # refuse: the idle connection still works, so drop it first (as a restarted server would).
        proxy.set_mode("cut")
        proxy.set_mode("refuse")
        time.sleep(CACHE)  # let the cached ok expire
        response, took = get_db(client)
        assert (response.status_code, response.json()) == (503, {"status": "down"})
        assert took < WELL_WITHIN

        # Back within a cache period and a deadline; a hung probe would hold it for 30 s.
        proxy.set_mode("pass")
        wait_until(lambda: client.get("/health/db").json() == {"status": "ok"}, WELL_WITHIN, "no recovery")

        # stall: the idle connection is black-holed and new connections are never answered. A
        # probe that misses its deadline says saturated (200 "degraded" by default), not down,
        # until the pool has made no progress for the stall window (10 s: not reached here).
        proxy.set_mode("stall")
        time.sleep(CACHE)
        response, took = get_db(client)
        assert (response.status_code, response.json()) == (200, {"status": "degraded"})
        assert took < WELL_WITHIN
        # Nothing left hanging: the probe finished, its connection is gone from the proxy and
        # from the pool, and nobody waits in the pool.
        wait_until(lambda: not probe_in_flight(recorder), 10, "the probe is still running")
        wait_until(lambda: proxy.open_clients == 0, 10, "the probe left a connection open")
        assert value(registry, "poolwatch_connections", pool="primary", state="used") == 0
        assert value(registry, "poolwatch_pending_requests", pool="primary") == 0

        # Back within a cache period and a deadline; a hung probe would hold it for 30 s.
        proxy.set_mode("pass")
        wait_until(lambda: client.get("/health/db").json() == {"status": "ok"}, WELL_WITHIN, "no recovery")


@pytest.mark.parametrize("warm", [True, False], ids=["idle-connection", "new-connection"])
async def test_stalled_async_probe_is_cancelled_and_leaves_nothing(
    postgres_url: str, proxy: FaultProxy, registry: CollectorRegistry, warm: bool
) -> None:
    engine = create_async_engine(
        proxied(postgres_url, proxy, "asyncpg"), pool_size=1, max_overflow=0, pool_timeout=30
    )
    watch = poolwatch.watch(
        engine, registry=registry, name="direct", health_deadline_seconds=0.3,
        health_cache_seconds=0,
    )  # fmt: skip
    [recorder] = watch.recorders
    health = HealthEndpoints(watch)
    if warm:
        assert await call(health.db) == (200, b'{"status":"ok"}')
    proxy.set_mode("stall")
    before = asyncio.all_tasks()
    started = time.monotonic()
    # Missed its deadline: saturated (200 "degraded"), within the stall window of 10 s.
    assert await call(health.db) == (200, b'{"status":"degraded"}')
    assert time.monotonic() - started < WELL_WITHIN
    await wait_until_async(
        lambda: (
            not probe_in_flight(recorder) and not (asyncio.all_tasks() - before) and proxy.open_clients == 0
        ),
        10,
        "the probe left a task, or a connection, behind",
    )
    assert value(registry, "poolwatch_connections", pool="direct", state="used") == 0
    assert value(registry, "poolwatch_pending_requests", pool="direct") == 0
    # The pool is usable again as soon as the network is.
    proxy.set_mode("pass")
    assert await call(health.db) == (200, b'{"status":"ok"}')
    await engine.dispose()


def test_sync_probe_overrun_keeps_single_flight(
    postgres_url: str, proxy: FaultProxy, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(
        proxied(postgres_url, proxy, "psycopg"), pool_size=1, max_overflow=0, pool_timeout=30
    )
    app = Starlette()
    watch = poolwatch.instrument(
        app, engine, registry=registry, name="sync", health_deadline_seconds=0.3,
        health_cache_seconds=0,
    )  # fmt: skip
    [recorder] = watch.recorders
    proxy.set_mode("stall")
    with served(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(4):
            response, took = get_db(client)
            # Overran its deadline: saturated (200 "degraded") within the 10 s stall window.
            assert (response.status_code, response.json()) == (200, {"status": "degraded"})
            assert took < WELL_WITHIN
        # The first probe's thread is still stuck in connect; no second one was started.
        assert probe_in_flight(recorder)
        assert proxy.accepted == 1
    proxy.stop()  # the stalled socket closes, and the probe's thread gets its error
    wait_until(lambda: not probe_in_flight(recorder), 10, "the sync probe never returned")
    engine.dispose()


def test_stall_fails_app_requests_by_their_timeouts_while_live_answers(
    postgres_url: str, proxy: FaultProxy, registry: CollectorRegistry
) -> None:
    # The app's own timeouts end its stuck requests; live must answer while they are stuck, and
    # health must see the stall (its window, 2 s here, between two checks) before they end: eight
    # seconds are ample time to ask.
    engine = create_async_engine(
        proxied(postgres_url, proxy, "asyncpg"),
        pool_size=1,
        max_overflow=0,
        pool_timeout=8,
        connect_args={"timeout": 8, "command_timeout": 8},
    )
    app, _ = make_app(engine, registry, health_deadline_seconds=DEADLINE, health_stall_seconds=2)
    with served(app) as url, httpx.Client(base_url=url, timeout=15) as client:
        assert client.get("/one").status_code == 200
        proxy.set_mode("stall")
        finished: list[float] = []

        def app_request() -> int:
            with httpx.Client(base_url=url, timeout=15) as own:
                status = own.get("/one").status_code
            finished.append(time.monotonic())
            return status

        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(app_request) for _ in range(3)]
            # One request holds the stalled connection, the others queue behind it.
            wait_until(
                lambda: value(registry, "poolwatch_pending_requests", pool="primary") == 2,
                5,
                "the app's requests never queued",
            )
            live = client.get("/health/live")
            live_at = time.monotonic()
            assert (live.status_code, live.json()) == (200, {"status": "ok"})
            # A black-holed database behind a full pool. The first check has seen no progress
            # yet: saturated (200 "degraded" by default). Once two checks bracket the stall
            # window with nothing moved, it is down (stalled), 503, while the requests are still
            # stuck. (That it answers well within its deadline, never after pool_timeout, is
            # test_probe_stalls' question, asked with a pool_timeout of 30 s.)
            response, _ = get_db(client)
            assert (response.status_code, response.json()) == (200, {"status": "degraded"})
            first_asked = time.monotonic()
            answers = []
            while not answers or answers[-1] == (200, {"status": "degraded"}):
                time.sleep(0.5)
                response, _ = get_db(client)
                answers.append((response.status_code, response.json()))
            assert answers[-1] == (503, {"status": "down"}), answers
            assert time.monotonic() - first_asked >= 2
            assert finished == [], "the requests ended before the stall was seen: too slow a machine?"
            statuses = [future.result() for future in futures]
    # live answered while every app request was still stuck, and every one then failed by its
    # own timeout (command_timeout for the one on the wire, pool_timeout for those queued).
    assert all(at > live_at for at in finished)
    assert statuses == [500, 500, 500]
    samples = scrape(registry)
    assert samples.total("poolwatch_timeouts_total", pool="primary") == 2
    # The one statement on the wire failed by command_timeout; nothing else ran a statement.
    assert samples.find("poolwatch_query_errors_total", pool="primary") == [
        ({"pool": "primary", "operation": "SELECT", "error": "TimeoutError"}, 1.0)
    ]


@pytest.fixture
def own_database(postgres_url: str) -> Iterator[str]:
    """A database of this test's own, so the demo's tables touch nobody else's."""
    name = f"poolwatch_faults_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_demo_app_recovers_from_a_cut_under_load(
    own_database: str, proxy: FaultProxy, registry: CollectorRegistry
) -> None:
    pool_timeout = 5.0
    settings = DemoSettings(
        database_url=proxied(own_database, proxy, "asyncpg").replace("+asyncpg", ""),
        pool_size=5, max_overflow=5, pool_timeout=pool_timeout, pool_pre_ping=True,
        misbehave=False,
    )  # fmt: skip
    app = create_app(settings=settings, registry=registry)
    Result = tuple[float, float, int]  # (started, took, status)

    async def load(url: str, cut_after: float, run_for: float) -> tuple[list[Result], tuple[float, float]]:
        results: list[Result] = []
        # No keep-alive: uvicorn closes a connection whose request raised, and a request sent
        # on it at that moment would fail in the client, not in the app.
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
            stop_at = time.monotonic() + run_for

            async def worker() -> None:
                while time.monotonic() < stop_at:
                    started = time.monotonic()
                    try:
                        status = (await client.get("/users?limit=5")).status_code
                    except httpx.HTTPError:
                        status = 0
                    results.append((started, time.monotonic() - started, status))

            async def cutter() -> tuple[float, float]:
                await asyncio.sleep(cut_after)
                cut_from = time.monotonic()
                await asyncio.to_thread(proxy.set_mode, "cut")
                return cut_from, time.monotonic()

            *_, cut = await asyncio.gather(*(worker() for _ in range(50)), cutter())
        return results, cut

    async def burst(url: str) -> list[Result]:
        # No keep-alive: uvicorn closes a connection whose request raised, and a request sent
        # on it at that moment would fail in the client, not in the app.
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

            async def one() -> Result:
                started = time.monotonic()
                status = (await client.get("/users?limit=5")).status_code
                return (started, time.monotonic() - started, status)

            return await asyncio.gather(*(one() for _ in range(50)))

    with served(app) as url:
        before = scrape(registry)
        invalidations_before = sum(v for _, v in before.find("poolwatch_invalidations_total"))
        results, (cut_from, cut_done) = asyncio.run(load(url, cut_after=1.0, run_for=2.5))
        after_recovery = asyncio.run(burst(url))
        samples = scrape(registry)
        wait_until(
            lambda: value(registry, "poolwatch_connections", pool="primary", state="used") == 0,
            5,
            "connections still checked out after the load",
        )
    before_cut = [r for r in results if r[0] + r[1] < cut_from]
    after_cut = [r for r in results if r[0] > cut_done]
    assert before_cut and after_cut, "the cut did not land under load"
    assert all(status == 200 for _, _, status in before_cut)
    # Requests that started after the cut, and a fresh burst of 50, all succeed.
    assert [status for _, _, status in after_cut if status != 200] == []
    assert [status for _, _, status in after_recovery] == [200] * 50
    # The cut shows in the counters: dead connections found by pre-ping or invalidated in use.
    invalidations = sum(v for _, v in samples.find("poolwatch_invalidations_total", pool="primary"))
    # Found by pre-ping or in use, every dead connection was invalidated (the pool holds 10 at
    # most; how many were open at the cut, and found which way, the load decides).
    assert invalidations - invalidations_before >= 1
    disconnected = dict(
        (labels["reason"], count)
        for labels, count in samples.find("poolwatch_disconnects_total", pool="primary")
    )
    assert disconnected["invalidated"] >= 1
    assert disconnected["reset_failed"] == disconnected["disposed"] == disconnected["other"] == 0
    assert samples.total("poolwatch_timeouts_total", pool="primary") == 0
    slowest = max(took for _, took, _ in [*results, *after_recovery])
    assert slowest < pool_timeout


async def test_a_terminated_backend_is_replaced_not_reported_down(
    postgres_url: str, proxy: FaultProxy, registry: CollectorRegistry
) -> None:
    engine = create_async_engine(proxied(postgres_url, proxy, "asyncpg"), pool_size=1, max_overflow=0)
    watch = poolwatch.watch(engine, registry=registry, name="terminated", health_cache_seconds=0)
    health = HealthEndpoints(watch)
    async with engine.connect() as connection:
        pid = (await connection.execute(sa.text("SELECT pg_backend_pid()"))).scalar()
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        # With a timeout, PostgreSQL answers once the backend is gone: the probe finds it dead.
        assert admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone() == (True,)
    invalidations = total(registry, "poolwatch_invalidations_total", pool="terminated")
    assert await call(health.db) == (200, b'{"status":"ok"}')
    # The dead connection was thrown away and a fresh one answered.
    assert total(registry, "poolwatch_invalidations_total", pool="terminated") == invalidations + 1
    assert value(registry, "poolwatch_connects_total", pool="terminated") == 2
    await engine.dispose()


# -- the same faults through a real uvicorn ----------------------------------------------------------


@pytest.mark.parametrize("warm", [True, False], ids=["idle-connection", "new-connection"])
def test_stalled_async_probe_under_uvicorn_answers_degraded_and_leaves_nothing(
    postgres_url: str, proxy: FaultProxy, registry: CollectorRegistry, warm: bool
) -> None:
    engine = create_async_engine(
        proxied(postgres_url, proxy, "asyncpg"), pool_size=1, max_overflow=0, pool_timeout=30
    )
    app, watch = make_app(engine, registry, health_deadline_seconds=0.3, health_cache_seconds=0)
    [recorder] = watch.recorders
    with served(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        if warm:
            assert client.get("/health/db").json() == {"status": "ok"}
        proxy.set_mode("stall")
        response, took = get_db(client)
        assert (response.status_code, response.json(), took < WELL_WITHIN) == (
            200,
            {"status": "degraded"},
            True,
        )
        wait_until(
            lambda: not probe_in_flight(recorder) and proxy.open_clients == 0,
            10,
            "the probe left a connection behind",
        )
        assert value(registry, "poolwatch_connections", pool="primary", state="used") == 0
        assert value(registry, "poolwatch_pending_requests", pool="primary") == 0
        # The pool is usable again as soon as the network is.
        proxy.set_mode("pass")
        assert client.get("/health/db").json() == {"status": "ok"}
        assert client.get("/one").json() == {"one": 1}


def test_a_terminated_backend_under_uvicorn_is_replaced_not_reported_down(
    postgres_url: str, proxy: FaultProxy, registry: CollectorRegistry
) -> None:
    # A name of this test's own, so it terminates its own backend and nobody else's.
    name = f"poolwatch-terminated-{uuid.uuid4().hex[:12]}"
    engine = create_async_engine(
        proxied(postgres_url, proxy, "asyncpg"), pool_size=1, max_overflow=0,
        connect_args={"server_settings": {"application_name": name}},
    )  # fmt: skip
    app, _ = make_app(engine, registry, health_cache_seconds=0)
    with served(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/one").json() == {"one": 1}  # its connection now waits in the pool
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            terminated = admin.execute(
                "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE application_name = %s",
                (name,),
            ).fetchall()
        assert terminated == [(True,)]
        invalidations = total(registry, "poolwatch_invalidations_total", pool="primary")
        assert client.get("/health/db").json() == {"status": "ok"}
        # The dead connection was thrown away and a fresh one answered.
        assert total(registry, "poolwatch_invalidations_total", pool="primary") == invalidations + 1
        assert value(registry, "poolwatch_connects_total", pool="primary") == 2
