"""What ``/health/db`` decides besides the probe's verdict, in process: the event when a pool's
reported health changes, compared whole; the answer when poolwatch itself fails; when details are
shown; and which pools the sidecar without an event loop probes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import create_async_engine
from structlog.testing import capture_logs

import poolwatch
from poolwatch._log import internal_errors
from poolwatch._serve import health
from poolwatch._serve.health import HealthEndpoints
from poolwatch._serve.probe import NO_OWNING_LOOP

TOKEN = "s3cret-token-for-details"


class Switch:
    """A connection factory the test turns off: then every new connection is refused."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.on = True

    def __call__(self) -> psycopg.Connection[Any]:
        if not self.on:
            raise ConnectionRefusedError("switched off")
        return psycopg.connect(self.url)


@pytest.fixture
def switch(postgres_url: str) -> Switch:
    return Switch(postgres_url)


@pytest.fixture
def engine(switch: Switch) -> Iterator[sa.Engine]:
    engine = sa.create_engine("postgresql+psycopg://", creator=switch, pool_size=2, max_overflow=0)
    yield engine
    engine.dispose()


async def test_a_change_of_health_is_one_event_with_the_pool_as_it_was(
    engine: sa.Engine, switch: Switch, registry: CollectorRegistry
) -> None:
    watch = poolwatch.watch(engine, registry=registry, name="sw", health_cache_seconds=0)
    endpoints = HealthEndpoints(watch)
    try:
        with capture_logs() as events:
            assert (await endpoints.answer_db("GET")).status == 200  # the first answer: no change
            assert (await endpoints.answer_db("GET")).status == 200
            engine.pool.dispose()  # no idle connection left: the probe must open one
            switch.on = False
            assert (await endpoints.answer_db("GET")).status == 503
            assert (await endpoints.answer_db("GET")).status == 503  # still down: no new event
            switch.on = True
            assert (await endpoints.answer_db("GET")).status == 200
    finally:
        watch.close()
    changes = [event for event in events if event["event"] == "poolwatch.health_changed"]
    assert changes == [
        {
            "event": "poolwatch.health_changed", "log_level": "warning", "pool": "sw", "status": "down",
            "previous": "ok", "used": 0, "max": 2, "pending": 0, "error": "ConnectionRefusedError",
        },
        {
            "event": "poolwatch.health_changed", "log_level": "info", "pool": "sw", "status": "ok",
            "previous": "down", "used": 0, "max": 2, "pending": 0,  # no error: none is logged
        },
    ]  # fmt: skip


async def test_a_failure_of_poolwatchs_own_is_counted_and_answered_down(
    engine: sa.Engine, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("poolwatch's own bug")

    monkeypatch.setattr(health, "check_pool", broken)
    watch = poolwatch.watch(engine, registry=registry, name="broken")
    errors = internal_errors.count
    try:
        answer = await HealthEndpoints(watch).answer_db("GET")
    finally:
        watch.close()
    assert (answer.status, answer.body) == (503, b'{"status":"down"}')
    assert internal_errors.count == errors + 1


@pytest.mark.parametrize(
    ("details", "authorization", "shown"),
    [
        ("never", f"Bearer {TOKEN}", False),  # a token set, but details are never shown
        ("token", f"Bearer {TOKEN}", True),
        ("token", f"Bearer   {TOKEN}", True),  # several spaces after the scheme (RFC 9110: 1*SP)
        ("token", f"bearer {TOKEN} ", True),
        ("token", f"Bearer {TOKEN} x", False),
    ],
)
async def test_details_only_where_the_setting_and_the_token_allow(
    engine: sa.Engine, registry: CollectorRegistry, details: Any, authorization: str, shown: bool
) -> None:
    watch = poolwatch.watch(engine, registry=registry, name="d", health_details=details, health_token=TOKEN)
    try:
        answer = await HealthEndpoints(watch).answer_db("GET", authorization)
    finally:
        watch.close()
    assert answer.status == 200
    assert (b'"pools"' in answer.body) is shown


async def test_without_an_owning_loop_only_the_async_pools_go_unprobed(
    engine: sa.Engine, async_url: str, registry: CollectorRegistry
) -> None:
    """The sidecar without an event loop probes its sync pools and answers the async ones from
    their state alone."""
    async_engine = create_async_engine(async_url, pool_size=2, max_overflow=0)
    watch = poolwatch.watch(
        {"sync": engine, "async": async_engine}, registry=registry, health_details="always"
    )
    try:
        answer = await HealthEndpoints(watch, probe_async_pools=False).answer_db("GET")
    finally:
        watch.close()
        await async_engine.dispose()
    pools = json.loads(answer.body)["pools"]
    assert pools["async"]["probe"] == NO_OWNING_LOOP and pools["async"]["latency_seconds"] is None
    assert "probe" not in pools["sync"] and pools["sync"]["latency_seconds"] > 0
