"""Issue 27's metrics end to end: provoked for real on PostgreSQL (psycopg and asyncpg) in an app
under a real uvicorn, scraped by a real Prometheus, read back through the dashboards' own panel
queries and the idle-in-transaction alert's expression.

What is provoked: a transaction left idle (both drivers), a yield dependency's session held through
a streaming body (both drivers), callers queued for a one-connection pool, a wait cancelled by
``asyncio.wait_for`` (not a timeout), and connections closed as overflow and as invalidated.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml
from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import poolwatch
from tests.fault_fixtures import Served
from tests.ports import free_port
from tests.test_operator_e2e import _process, _wait_until_ok
from tests.test_operator_kit import RULES, load_rules, panel_queries, require_tool

JOB = "issue27"
PAUSE = 1.2  # idle in a transaction / held after the response started, per request
WINDOW = "1m"

# The panels this issue added, by title, and what each must show for the provoked routes.
PANELS = {
    "Idle in transaction by route",
    "Held after the response started by route",
    "Checkouts that queued, and waits cancelled",
    "Disconnects by reason",
}


def _app(sync_url: str, async_url: str, registry: CollectorRegistry) -> FastAPI:
    sync_engine = sa.create_engine(sync_url, pool_size=1, max_overflow=1)
    async_engine = create_async_engine(async_url, pool_size=2)
    tight = create_async_engine(async_url, pool_size=1, max_overflow=0, pool_timeout=30)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # On the server's own loop: asyncpg's connections belong to it.
        sync_engine.dispose()
        await async_engine.dispose()
        await tight.dispose()

    app = FastAPI(lifespan=lifespan)
    poolwatch.instrument(app, {"sync": sync_engine, "async": async_engine, "tight": tight}, registry=registry)

    def sync_session() -> Iterator[Session]:
        with Session(sync_engine) as db:
            yield db

    async def async_session() -> AsyncIterator[AsyncSession]:
        async with AsyncSession(async_engine) as db:
            yield db

    @app.get("/idle-tx-sync")
    def idle_sync() -> dict[str, bool]:
        with sync_engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
            time.sleep(PAUSE)
            connection.commit()
        return {"ok": True}

    @app.get("/idle-tx-async")
    async def idle_async() -> dict[str, bool]:
        async with async_engine.connect() as connection:
            await connection.exec_driver_sql("SELECT 1")
            await asyncio.sleep(PAUSE)
            await connection.commit()
        return {"ok": True}

    def sync_chunks() -> Iterator[bytes]:
        time.sleep(PAUSE)
        yield b"x"

    async def async_chunks() -> AsyncIterator[bytes]:
        await asyncio.sleep(PAUSE)
        yield b"x"

    @app.get("/stream-sync")
    def stream_sync(db: Session = Depends(sync_session)) -> StreamingResponse:  # noqa: B008
        db.execute(sa.text("SELECT 1"))
        return StreamingResponse(sync_chunks())

    @app.get("/stream-async")
    async def stream_async(db: AsyncSession = Depends(async_session)) -> StreamingResponse:  # noqa: B008
        await db.execute(sa.text("SELECT 1"))
        return StreamingResponse(async_chunks(), media_type="text/event-stream")

    @app.get("/tight")
    async def use_tight() -> dict[str, bool]:
        async with tight.connect() as connection:
            await connection.exec_driver_sql("SELECT pg_sleep(0.2)")
        return {"ok": True}

    @app.get("/give-up")
    async def give_up() -> dict[str, bool]:
        async def checkout() -> None:
            async with tight.connect():
                pass

        async with tight.connect():  # the one connection is out: the next caller queues
            try:
                await asyncio.wait_for(checkout(), 0.2)  # ... and is cancelled: a client giving up
            except TimeoutError:
                return {"cancelled": True}
        return {"cancelled": False}

    @app.get("/churn")
    def churn() -> dict[str, bool]:
        first, second = sync_engine.connect(), sync_engine.connect()  # the second is overflow
        first.close()
        second.close()
        with sync_engine.connect() as connection:
            connection.invalidate()
        return {"ok": True}

    return app


def _query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer.get("status") == "success", f"{expr}: {answer}"
    return list(answer["data"]["result"])


def _substitute(expr: str, instance: str) -> str:
    # Unescaped, as Grafana sends a single value ("." in an address still matches itself).
    values = {"job": JOB, "instance": instance, "pool": ".*", "__rate_interval": WINDOW}
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], expr)


def _by(results: list[dict[str, Any]], label: str) -> dict[str, float]:
    """Each series' value, keyed by ``label`` (NaN, from an empty histogram, as 0)."""
    found = {}
    for series in results:
        number = float(series["value"][1])
        found[series["metric"].get(label, "")] = 0.0 if number != number else number
    return found


@pytest.fixture(scope="module")
def prometheus_and_app(
    postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    prometheus_bin = require_tool("prometheus")
    work: Path = tmp_path_factory.mktemp("issue27")
    registry = CollectorRegistry()
    sync_url = postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)
    async_url = postgres_url.replace("postgresql://", "postgresql+asyncpg://", 1)
    app = _app(sync_url, async_url, registry)
    with Served(app) as served:
        instance = served.url.removeprefix("http://")
        prom_port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [instance]}]}],
        }
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        args = [
            prometheus_bin,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ]
        prometheus = f"http://127.0.0.1:{prom_port}"
        with _process(args, work / "prometheus.log", dict(os.environ)) as process:
            _wait_until_ok(f"{prometheus}/-/ready", process, work / "prometheus.log", "Prometheus")
            up = f'up{{job="{JOB}"}} == 1'
            deadline = time.monotonic() + 30
            while not _query(prometheus, up):
                assert time.monotonic() < deadline, "Prometheus never scraped the app"
                time.sleep(0.5)
            time.sleep(2)  # a few scrapes of zeros first: rate() needs a before
            # Twice, scraped in between: a route's series appears with its first checkin, and
            # rate() sees an increase only from its second sample on.
            for _ in range(2):
                _provoke(served.url)
                time.sleep(3)
            yield prometheus, instance


def _provoke(url: str) -> None:
    paths = ["/idle-tx-sync", "/idle-tx-async", "/stream-sync", "/stream-async", "/give-up", "/churn"]
    paths += ["/tight"] * 4
    with httpx.Client(base_url=url, timeout=60) as client:
        threads = [threading.Thread(target=client.get, args=(path,)) for path in paths]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)


def _panel(title: str) -> list[str]:
    exprs = [expr for _, panel_title, expr in panel_queries() if panel_title == title]
    assert exprs, f"no panel {title!r}"
    return exprs


def test_the_new_panels_show_what_was_provoked(prometheus_and_app: tuple[str, str]) -> None:
    prometheus, instance = prometheus_and_app
    idle_rate, _ = (
        _by(_query(prometheus, _substitute(e, instance)), "route") for e in _panel(PANELS_ORDER[0])
    )
    assert idle_rate["/idle-tx-sync"] > 0 and idle_rate["/idle-tx-async"] > 0, idle_rate
    held_rate, _ = (
        _by(_query(prometheus, _substitute(e, instance)), "route") for e in _panel(PANELS_ORDER[1])
    )
    assert held_rate["/stream-sync"] > 0 and held_rate["/stream-async"] > 0, held_rate
    queued, cancelled = (
        _by(_query(prometheus, _substitute(e, instance)), "pool") for e in _panel(PANELS_ORDER[2])
    )
    assert queued["tight"] > 0 and cancelled["tight"] > 0, (queued, cancelled)
    [disconnects] = _panel(PANELS_ORDER[3])
    reasons = {
        (series["metric"]["pool"], series["metric"]["reason"]): float(series["value"][1])
        for series in _query(prometheus, _substitute(disconnects, instance))
    }
    assert reasons[("sync", "overflow")] > 0 and reasons[("sync", "invalidated")] > 0, reasons


def test_the_alert_sees_the_idle_transaction_and_only_it(prometheus_and_app: tuple[str, str]) -> None:
    prometheus, _ = prometheus_and_app
    [rule] = [rule for rule in load_rules() if rule["alert"] == "PoolWatchIdleInTransaction"]
    # The app's transactions were idle 1.2 s, under the alert's 5 s: it stays silent.
    assert _query(prometheus, rule["expr"]) == []
    # The same expression one bucket lower (1 s) finds exactly the routes that left a transaction
    # open while idle: the two that slept in one, and the two streams, whose yield dependency's
    # session stayed in its transaction while the body was sent. /give-up held its connection
    # idle outside any transaction; /tight spent its hold inside a statement.
    lowered = rule["expr"].replace('le="5.0"', 'le="1.0"')
    routes = {series["metric"]["route"] for series in _query(prometheus, lowered)}
    assert routes == {"/idle-tx-sync", "/idle-tx-async", "/stream-sync", "/stream-async"}, routes


PANELS_ORDER = (
    "Idle in transaction by route",
    "Held after the response started by route",
    "Checkouts that queued, and waits cancelled",
    "Disconnects by reason",
)
assert set(PANELS_ORDER) == PANELS
