"""The live page's JSON, row for row: an event as the page shows it, a read after the builder's
caches are dropped, and the answer when building fails.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import poolwatch
from poolwatch._log import internal_errors
from poolwatch._record.events import GcReclaimed, LeakDetected, emit, recent
from poolwatch._serve.page import LivePage
from poolwatch._serve.state import StateBuilder


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
