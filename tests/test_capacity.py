"""Fleet capacity against the server, end to end: a real PgBouncer, a slow link, the alert.

- Behind a real PgBouncer (Debian's package, started here as an unprivileged user and ended by
  PID) the server answering is the backend, on another port than the URL's: no limit is claimed,
  that is logged once, and the alert, fed with what the pods really export, stays silent; the
  same pools connected to the server itself make it fire.
- Over a link with 80 ms round trips, ``/health/db`` never answers 503 because of the limit read,
  the probe's warm connections are never thrown away, and the limit is read all the same, started
  by ``/health/db`` itself (``HealthEndpoints._check`` calls ``ensure_read``).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.testclient import TestClient
from structlog.testing import capture_logs

import poolwatch
from poolwatch._capture.capacity import reader
from poolwatch._capture.pool_hooks import recorder_of
from poolwatch._record.recorder import PoolRecorder
from tests.metrics import parse_text, scrape
from tests.pgbouncer import PgBouncer, pgbouncer  # noqa: F401
from tests.proxy import FaultProxy
from tests.test_server_limit import (  # noqa: F401
    await_until,
    link,
    pg_client_limit,
    read_sync,
    server_max,
    through,
    wait_until,
    warm_async,
    watched,
)

RULES = Path(__file__).resolve().parent.parent / "dashboards" / "alerts" / "poolwatch.rules.yml"
ALERT = "PoolWatchFleetCapacityExceedsServer"


# -- behind PgBouncer ------------------------------------------------------------------------------


def test_behind_pgbouncer_no_limit_is_claimed_and_that_is_said_once(
    postgres_url: str,
    pgbouncer: PgBouncer,  # noqa: F811
    registry: CollectorRegistry,
) -> None:
    engine = sa.create_engine(pgbouncer.url(postgres_url), pool_size=2, max_overflow=0)
    try:
        recorder = watched(engine, registry, "bounced")
        with capture_logs() as events:
            read_sync(engine, recorder)
            assert recorder.server_limit_read_at is not None  # the read ran and succeeded
            assert server_max(registry, "bounced") == []
            # A refresh finds the same and says nothing more.
            state = reader.reader_state(recorder)
            state.next_at = 0.0
            first = recorder.server_limit_read_at
            reader.ensure_read(recorder)
            wait_until(lambda: not state.running and recorder.server_limit_read_at != first, "the refresh")
        told = [event for event in events if event["event"] == "poolwatch.server_limit_not_claimed"]
        assert len(told) == 1
        assert told[0]["pool"] == "bounced" and "port" in told[0]["reason"]
        assert server_max(registry, "bounced") == []
        # The same query through PgBouncer does reach the backend, whose limit it would have claimed.
        with engine.connect() as connection:
            backend_port = connection.exec_driver_sql("SELECT inet_server_port()").scalar_one()
        assert backend_port == pgbouncer.upstream_port != pgbouncer.port
    finally:
        engine.dispose()


async def test_asyncpg_behind_pgbouncer_claims_no_limit(
    postgres_url: str,
    pgbouncer: PgBouncer,  # noqa: F811
    registry: CollectorRegistry,
) -> None:
    engine = create_async_engine(pgbouncer.url(postgres_url, "asyncpg"), pool_size=2, max_overflow=0)
    try:
        recorder = watched(engine, registry, "bounced-async")
        await warm_async(engine)
        reader.ensure_read(recorder)
        await await_until(lambda: recorder.server_limit_read_at is not None, "the limit read")
        assert server_max(registry, "bounced-async") == []
    finally:
        await engine.dispose()


def _exported(url: str, name: str) -> list[tuple[str, dict[str, str], float]]:
    """What one pod of 40 connections (pool_size 40) to ``url`` exports for the capacity alert."""
    registry = CollectorRegistry()
    engine = sa.create_engine(url, pool_size=40, max_overflow=0)
    try:
        recorder = watched(engine, registry, name)
        read_sync(engine, recorder)
        samples = parse_text(generate_latest(registry).decode())
    finally:
        engine.dispose()
    wanted = ("poolwatch_pool_info", "poolwatch_connections_max", "poolwatch_server_connections_max")
    return [(metric, labels, value) for metric in wanted for labels, value in samples.find(metric, pool=name)]


def _series(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ", ".join(f'{key}="{value}"' for key, value in sorted(labels.items())) + "}"


def _run_promtool(
    tmp_path: Path, series: list[tuple[str, dict[str, str], float]], test: dict[str, Any]
) -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: bash scripts/setup.sh test (Debian's prometheus package)")
    # Three pods exporting the same: 3 x 40 = 120 connections, more than the server's 97-odd slots.
    inputs = [
        {
            "series": _series(metric, {**labels, "job": "api", "instance": f"api-{pod}:8000"}),
            "values": f"{value:g}x40",
        }
        for pod in (1, 2, 3)
        for metric, labels, value in series
    ]
    document = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": inputs, **test}],
    }
    path = tmp_path / "capacity.test.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    result = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    return f"{result.returncode}\n{result.stdout}{result.stderr}"


def _alert_expr() -> str:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == ALERT:
                return str(rule["expr"])
    raise AssertionError(f"{ALERT} is not in {RULES}")


def test_the_alert_on_real_exports_fires_for_the_server_and_stays_silent_behind_pgbouncer(
    postgres_url: str,
    pgbouncer: PgBouncer,  # noqa: F811
    tmp_path: Path,
) -> None:
    direct = _exported(postgres_url.replace("postgresql://", "postgresql+psycopg://", 1), "primary")
    (limit,) = [value for metric, _, value in direct if metric == "poolwatch_server_connections_max"]
    assert limit == pg_client_limit(postgres_url) < 120
    (info,) = [labels for metric, labels, _ in direct if metric == "poolwatch_pool_info"]
    # Connected to the server itself, three pods of 40 exceed its limit: the alert fires.
    fired = _run_promtool(
        tmp_path,
        direct,
        {
            "promql_expr_test": [
                {
                    "expr": _alert_expr(),
                    "eval_time": "20m",
                    "exp_samples": [
                        {
                            "labels": _series("", {"server": info["server"], "role": info["role"]}),
                            "value": 120,
                        }
                    ],
                },
                {
                    "expr": f'ALERTS{{alertname="{ALERT}", alertstate="firing"}}',
                    "eval_time": "20m",
                    "exp_samples": [
                        {
                            "labels": _series(
                                "ALERTS",
                                {
                                    "alertname": ALERT,
                                    "alertstate": "firing",
                                    "server": info["server"],
                                    "role": info["role"],
                                    "severity": "warning",
                                },
                            ),
                            "value": 1,
                        }
                    ],
                },
            ]
        },
    )
    assert fired.startswith("0\n"), fired
    # The same pods through PgBouncer: its endpoint is their server, no limit is exported for it,
    # and nothing fires (the old code exported the backend's limit here, and the alert fired).
    bounced = _exported(pgbouncer.url(postgres_url), "primary")
    assert [metric for metric, _, _ in bounced if metric == "poolwatch_server_connections_max"] == []
    silent = _run_promtool(
        tmp_path,
        bounced,
        {
            "promql_expr_test": [{"expr": _alert_expr(), "eval_time": "20m", "exp_samples": []}],
            "alert_rule_test": [{"eval_time": "20m", "alertname": ALERT, "exp_alerts": []}],
        },
    )
    assert silent.startswith("0\n"), silent


def recorder_for(engine: Any) -> PoolRecorder:
    recorder = recorder_of(engine.sync_engine.pool if hasattr(engine, "sync_engine") else engine.pool)
    assert recorder is not None
    return recorder


# -- a slow link -------------------------------------------------------------------------------------


def _no_connection_thrown_away(registry: CollectorRegistry, pool: str, connects: int) -> None:
    samples = scrape(registry)
    assert samples.value("poolwatch_connects_total", pool=pool) == connects
    assert samples.total("poolwatch_invalidations_total", pool=pool) == 0
    assert samples.total("poolwatch_disconnects_total", pool=pool) == 0


async def test_over_an_80ms_link_async_probes_never_fail_and_keep_their_warm_connections(
    postgres_url: str,
    link: FaultProxy,  # noqa: F811
    registry: CollectorRegistry,
) -> None:
    link.set_latency(0.04)  # each way: 80 ms round trips
    engine = create_async_engine(through(postgres_url, link, "asyncpg"), pool_size=2, max_overflow=0)
    app = Starlette()
    poolwatch.instrument(app, engine, registry=registry, name="slow", health_cache_seconds=0)
    recorder = recorder_for(engine)
    try:
        # Warm both slots first (opening a connection over this link takes longer than a probe's
        # deadline; that is the pool's business, not the limit read's).
        async with engine.connect() as first, engine.connect() as second:
            await first.execute(sa.text("SELECT 1"))
            await second.execute(sa.text("SELECT 1"))
        _no_connection_thrown_away(registry, "slow", 2)
        statuses: list[int] = []
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for _ in range(15):
                statuses.append((await client.get("/health/db")).status_code)
                await asyncio.sleep(0.05)
            await await_until(lambda: recorder.server_limit_read_at is not None, "the limit read")
            statuses.append((await client.get("/health/db")).status_code)
        assert statuses == [200] * len(statuses)
        assert server_max(registry, "slow") == [pg_client_limit(postgres_url)]
        _no_connection_thrown_away(registry, "slow", 2)
    finally:
        await engine.dispose()


def test_over_an_80ms_link_sync_probes_never_fail_and_keep_their_warm_connections(
    postgres_url: str,
    link: FaultProxy,  # noqa: F811
    registry: CollectorRegistry,
) -> None:
    link.set_latency(0.04)
    engine = sa.create_engine(through(postgres_url, link, "psycopg"), pool_size=2, max_overflow=0)
    app = Starlette()
    poolwatch.instrument(app, engine, registry=registry, name="slow-sync", health_cache_seconds=0)
    recorder = recorder_for(engine)
    try:
        with engine.connect() as first, engine.connect() as second:
            first.execute(sa.text("SELECT 1"))
            second.execute(sa.text("SELECT 1"))
        statuses: list[int] = []
        with TestClient(app) as client:
            for _ in range(15):
                statuses.append(client.get("/health/db").status_code)
            wait_until(lambda: recorder.server_limit_read_at is not None, "the limit read")
            statuses.append(client.get("/health/db").status_code)
        assert statuses == [200] * len(statuses)
        assert server_max(registry, "slow-sync") == [pg_client_limit(postgres_url)]
        _no_connection_thrown_away(registry, "slow-sync", 2)
    finally:
        engine.dispose()


async def test_health_db_starts_the_read_and_answers_before_it(
    postgres_url: str, async_url: str, registry: CollectorRegistry
) -> None:
    # No direct ensure_read here: /health/db is what starts the read, after its own answer.
    engine = create_async_engine(async_url, pool_size=2, max_overflow=0)
    app = Starlette()
    poolwatch.instrument(app, engine, registry=registry, name="wired", health_cache_seconds=0)
    recorder = recorder_for(engine)
    try:
        await warm_async(engine)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/health/db")).json()["status"] == "ok"
            await await_until(lambda: recorder.server_limit_read_at is not None, "the limit read")
        assert server_max(registry, "wired") == [pg_client_limit(postgres_url)]
    finally:
        await engine.dispose()
