"""The live page's JSON, row for row: an event as the page shows it, a read after the builder's
caches are dropped, and the answer when building fails.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

import poolwatch
from poolwatch._log import internal_errors
from poolwatch._record.context import RequestContext, current_request
from poolwatch._record.events import GcReclaimed, LeakDetected, emit, recent, recent_events
from poolwatch._serve.page import LivePage
from poolwatch._serve.state import MAX_EVENTS, StateBuilder, quantile


@pytest.fixture
def engine(sync_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sync_url, pool_size=2)
    yield engine
    engine.dispose()


def test_an_event_row_is_its_fields_with_time_kind_and_level(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    watch = poolwatch.watch(engine, registry=registry, name="rows")
    leak = LeakDetected("rows", "/a", 31.0, 30.0, "app.py:3", "handler", stack="SELECT 'secret'")
    emit(leak)
    (at,) = [at for at, event in recent() if event is leak]
    state = json.loads(StateBuilder().build(list(zip(watch.pool_names, watch.recorders, strict=True)), None))
    row = state["events"][0]
    fields = leak.fields()
    fields.pop("stack")
    assert row == {"time": round(at, 3), "kind": "leak_detected", "level": "warning", **fields}
    assert row["route"] == "/a" and row["seconds_held"] == 31.0 and "stack" not in row
    watch.close()


def test_a_read_after_forget_says_what_the_cached_read_said(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    watch = poolwatch.watch(engine, registry=registry, name="forgotten")
    recorders = list(zip(watch.pool_names, watch.recorders, strict=True))
    emit(GcReclaimed("forgotten", "/b", 1.5, "app.py:4", "lost"))
    with engine.connect() as held:
        held.execute(sa.text("SELECT 1"))
        builder = StateBuilder()
        first = json.loads(builder.build(recorders, None))
        cached = json.loads(builder.build(recorders, None))
        builder.forget()
        rebuilt = json.loads(builder.build(recorders, None))
        again = json.loads(builder.build(recorders, None))
    for later in (cached, rebuilt, again):
        assert [e["kind"] for e in later["events"]] == [e["kind"] for e in first["events"]]
        assert later["events"] == first["events"]
        assert len(later["pools"][0]["connections"]) == 1
    assert [e["kind"] for e in rebuilt["events"]][:1] == ["gc_reclaimed"]
    watch.close()


def test_a_state_that_cannot_be_built_is_a_500_naming_the_counter(
    engine: sa.Engine, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch = poolwatch.watch(engine, registry=registry, name="broken", ui="always")
    page = LivePage(watch)

    def fail(*args: object) -> str:
        raise RuntimeError("the builder broke")

    monkeypatch.setattr(page.builder, "build", fail)
    errors_before = internal_errors.count
    answer = page.answer("state", "GET")
    assert answer.status == 500
    assert answer.content_type == "application/json"
    assert (
        answer.body == b'{"detail":"poolwatch could not read its state; see poolwatch_internal_errors_total"}'
    )
    assert internal_errors.count == errors_before + 1
    watch.close()


def _rows(state: dict[str, Any]) -> list[dict[str, Any]]:
    pool = state["pools"][0]
    return [dict(zip(pool["connection_fields"], row, strict=True)) for row in pool["connections"]]


def test_a_checkout_row_names_a_site_never_seen_before(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    """A function compiled for this test only: its code object is new, so the row's site cannot come
    from any cache of an earlier read."""
    watch = poolwatch.watch(engine, registry=registry, name="sites")
    filename = f"fresh/app_{uuid.uuid4().hex}.py"
    namespace: dict[str, Any] = {}
    exec(compile("def handler(engine):\n\n    return engine.connect()\n", filename, "exec"), namespace)
    recorders = list(zip(watch.pool_names, watch.recorders, strict=True))
    connection = namespace["handler"](engine)
    try:
        for _ in range(2):  # encoded, then read back from the cache
            (row,) = _rows(json.loads(StateBuilder().build(recorders, None)))
            assert (row["site"], row["function"]) == (f"{filename}:3", "handler")
            assert (row["method"], row["route"]) == ("<none>", "<none>")
    finally:
        connection.close()
    watch.close()


def test_a_static_pool_row_tells_its_connection_age_and_uses(registry: CollectorRegistry) -> None:
    """StaticPool shares one record between checkouts, so rows are keyed by the checkout's proxy:
    the connection's age and use count are read through it."""
    engine = sa.create_engine("sqlite://", poolclass=sa.pool.StaticPool)
    watch = poolwatch.watch(engine, registry=registry, name="static")
    recorders = list(zip(watch.pool_names, watch.recorders, strict=True))
    for _ in range(3):
        with engine.connect() as used:
            used.execute(sa.text("SELECT 1"))
    with engine.connect() as held:
        held.execute(sa.text("SELECT 1"))
        (row,) = _rows(json.loads(StateBuilder().build(recorders, None)))
    assert row["uses"] == 4
    assert isinstance(row["connection_age_ms"], int) and row["connection_age_ms"] >= row["age_ms"]
    watch.close()
    engine.dispose()


def test_an_event_time_is_kept_to_the_millisecond(engine: sa.Engine, registry: CollectorRegistry) -> None:
    watch = poolwatch.watch(engine, registry=registry, name="clock")
    event = GcReclaimed("clock", "/t", 1.0, "app.py:9", "lost")
    recent_events.append((1_765_000_000.123456, event))
    (row,) = json.loads(
        StateBuilder().build(list(zip(watch.pool_names, watch.recorders, strict=True)), None)
    )["events"][:1]
    assert row["time"] == 1_765_000_000.123
    assert row["kind"] == "gc_reclaimed" and row["level"] == "error"
    watch.close()


def test_a_checkout_row_tells_the_connections_life_exactly(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    """A connection opened 1,000 s ago (its record's stamp moved back), used four times, idle in an
    open transaction, taken by a request whose response started after it: each column in its unit."""
    watch = poolwatch.watch(engine, registry=registry, name="life")
    recorders = list(zip(watch.pool_names, watch.recorders, strict=True))
    for _ in range(3):
        with engine.connect() as used:
            used.execute(sa.text("SELECT 1"))
    request = RequestContext({"type": "http", "route": None, "method": "GET"})
    request.resolved_route = "/stream"
    token = current_request.set(request)
    try:
        connection = engine.connect()
    finally:
        current_request.reset(token)
    try:
        connection.execute(sa.text("SELECT 1"))  # opens a transaction (autobegin) and leaves it open
        record = connection.connection._connection_record
        assert record is not None
        record.starttime = time.time() - 1000.0
        request.response_started = True
        request.response_started_at = time.perf_counter()
        before = time.perf_counter()
        time.sleep(0.3)
        (row,) = _rows(json.loads(StateBuilder().build(recorders, None)))
        after = time.perf_counter()
    finally:
        connection.close()
    assert (row["route"], row["method"]) == ("/stream", "GET")
    assert row["uses"] == 4
    elapsed_ms = (after - before) * 1000
    assert 1_000_000 <= row["connection_age_ms"] <= 1_000_000 + 1000 + elapsed_ms
    assert 300 <= row["idle_in_transaction_ms"] <= 300 + 1000 + elapsed_ms
    assert 300 <= row["after_response_ms"] <= 300 + elapsed_ms + 1
    watch.close()


def test_a_row_without_a_known_connection_life_says_null(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    """A record without a usable opening stamp gives no age (null), never a made-up one."""
    watch = poolwatch.watch(engine, registry=registry, name="unknown")
    recorders = list(zip(watch.pool_names, watch.recorders, strict=True))
    with engine.connect() as connection:
        record = connection.connection._connection_record
        assert record is not None
        record.starttime = 0.0
        (row,) = _rows(json.loads(StateBuilder().build(recorders, None)))
    assert row["connection_age_ms"] is None
    assert row["idle_in_transaction_ms"] == 0 and row["after_response_ms"] is None
    watch.close()


def test_a_row_read_before_routing_shows_the_route_once_routing_found_it(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    watch = poolwatch.watch(engine, registry=registry, name="routing")
    recorders = list(zip(watch.pool_names, watch.recorders, strict=True))
    request = RequestContext({"type": "http", "method": "POST"})  # no app, no route: unmatched yet
    token = current_request.set(request)
    try:
        connection = engine.connect()
    finally:
        current_request.reset(token)
    builder = StateBuilder()
    try:
        (early,) = _rows(json.loads(builder.build(recorders, None)))
        request.resolved_route = "/orders/{order_id}"
        (late,) = _rows(json.loads(builder.build(recorders, None)))
    finally:
        connection.close()
    assert (early["route"], early["method"]) == ("<unmatched>", "POST")
    assert (late["route"], late["method"]) == ("/orders/{order_id}", "POST")
    watch.close()


def test_a_state_that_cannot_be_built_is_served_as_a_500(
    engine: sa.Engine, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(self: StateBuilder, *args: object) -> str:
        raise RuntimeError("the builder broke")

    monkeypatch.setattr(StateBuilder, "build", fail)
    app = FastAPI()
    poolwatch.instrument(app, engine, registry=registry, name="served", ui="always")
    with TestClient(app) as client:
        answer = client.get("/poolwatch/state")
    assert answer.status_code == 500
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["cache-control"] == "no-store"
    assert answer.json() == {
        "detail": "poolwatch could not read its state; see poolwatch_internal_errors_total"
    }


def test_quantile_at_its_edges_like_prometheus() -> None:
    bounds = (0.1, 0.2, 0.4)
    assert quantile(0.5, bounds, [1, 0, 0, 0]) == pytest.approx(0.05)  # one observation
    assert quantile(0.0, bounds, [0, 4, 0, 0]) == pytest.approx(0.1)  # empty buckets are skipped
    assert quantile(0.9, bounds, [2, 3, 5, 0]) == pytest.approx(0.36)  # ranks run across buckets
    assert quantile(1.0, bounds, [2, 3, 5, 0]) == pytest.approx(0.4)


def test_the_state_says_when_it_was_generated(engine: sa.Engine, registry: CollectorRegistry) -> None:
    watch = poolwatch.watch(engine, registry=registry, name="generated")
    before = time.time()
    state = json.loads(StateBuilder().build(list(zip(watch.pool_names, watch.recorders, strict=True)), None))
    after = time.time()
    assert round(before, 3) <= state["generated_at"] <= round(after, 3)
    watch.close()


@pytest.mark.parametrize("threshold", [0.2, 0.0])
def test_held_past_the_leak_threshold_is_flagged_and_counted_and_a_threshold_of_0_flags_none(
    sync_url: str, registry: CollectorRegistry, threshold: float
) -> None:
    engine = sa.create_engine(sync_url, pool_size=3, max_overflow=0)
    watch = poolwatch.watch(engine, registry=registry, name="leaky", leak_threshold_seconds=threshold)
    recorders = list(zip(watch.pool_names, watch.recorders, strict=True))
    old = [engine.connect() for _ in range(2)]
    time.sleep(0.4)
    young = engine.connect()
    try:
        state = json.loads(StateBuilder().build(recorders, None))
    finally:
        for connection in (*old, young):
            connection.close()
        watch.close()
        engine.dispose()
    (pool,) = state["pools"]
    rows = _rows(state)
    assert [row["leaked"] for row in rows] == ([True, True, False] if threshold else [False] * 3)
    assert pool["now"]["leaked"] == (2 if threshold else 0)
    ages = [row["age_ms"] for row in rows]
    assert ages == sorted(ages, reverse=True) and ages[1] >= 400 > ages[2]  # oldest first
    assert pool["connections_out"] == 3
    assert pool["now"]["oldest_checkout_seconds"] * 1000 >= ages[0] - 1


def test_two_pools_and_a_bounded_list_of_events(sync_url: str, registry: CollectorRegistry) -> None:
    first, second = sa.create_engine(sync_url), sa.create_engine(sync_url)
    watch = poolwatch.watch({"first": first, "second": second}, registry=registry)
    recorders = list(zip(watch.pool_names, watch.recorders, strict=True))
    for n in range(MAX_EVENTS + 5):
        emit(GcReclaimed("second", f"/e/{n}", 1.0, "app.py:1", "lost"))
    try:
        state = json.loads(StateBuilder().build(recorders, None))
    finally:
        watch.close()
        first.dispose()
        second.dispose()
    assert [pool["name"] for pool in state["pools"]] == ["first", "second"]
    assert len(state["events"]) == MAX_EVENTS
    assert state["events"][0]["route"] == f"/e/{MAX_EVENTS + 4}"  # newest first
    assert state["window_seconds"] == 300.0


def test_a_pools_identity_and_its_state_now_are_exact(engine: sa.Engine, registry: CollectorRegistry) -> None:
    """Two connections out of a QueuePool of 2 (+10 overflow) and a third caller queued behind a
    full pool of one: the page's "now" block says exactly that, with what the pool is."""
    watch = poolwatch.watch(engine, registry=registry, name="now", leak_threshold_seconds=60)
    small = sa.create_engine(str(engine.url), pool_size=1, max_overflow=0, pool_timeout=30)
    other = poolwatch.watch(small, registry=CollectorRegistry(), name="full")
    first, second = engine.connect(), engine.connect()
    held = small.connect()
    waiter = threading.Thread(target=lambda: small.connect().close())
    waiter.start()
    try:
        (small_recorder,) = other.recorders
        give_up = time.monotonic() + 30
        while small_recorder.pending == 0:
            assert time.monotonic() < give_up, "the caller never queued"
            time.sleep(0.01)
        pools = [
            *zip(watch.pool_names, watch.recorders, strict=True),
            *zip(other.pool_names, other.recorders, strict=True),
        ]
        state = json.loads(StateBuilder().build(pools, None))
        by_name = {pool["name"]: pool for pool in state["pools"]}
        now = by_name["now"]
        assert {key: now[key] for key in ("name", "dialect", "driver", "pool_class", "leak_threshold_seconds")} == {
            "name": "now", "dialect": "postgresql", "driver": "psycopg", "pool_class": "QueuePool",
            "leak_threshold_seconds": 60.0,
        }  # fmt: skip
        assert {k: v for k, v in now["now"].items() if k != "oldest_checkout_seconds"} == {
            "used": 2, "idle": 0, "max": 12, "overflow": 0, "pending": 0, "leaked": 0,
        }  # fmt: skip
        full = by_name["full"]["now"]
        assert (full["used"], full["idle"], full["max"], full["pending"]) == (1, 0, 1, 1)
    finally:
        held.close()
        waiter.join(30)
        first.close()
        second.close()
        other.close()
        small.dispose()
        watch.close()
