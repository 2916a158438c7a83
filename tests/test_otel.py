"""OpenTelemetry: one span per statement, trace_id exemplars, and the semantic-convention bridge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from sqlalchemy.ext.asyncio import create_async_engine

import poolwatch
from poolwatch import otel_bridge
from poolwatch._otel import OPERATION_ATTRIBUTE, spread
from tests.fault_fixtures import wait_until
from tests.metrics import scrape

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """The process's tracer provider (it can be set once), exporting into memory."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(provider)
    yield _EXPORTER


def statement_spans(exporter: InMemorySpanExporter) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.attributes and OPERATION_ATTRIBUTE in s.attributes]


STATEMENTS = [
    ("DDL", "CREATE TEMPORARY TABLE otel_t (id int, name text)"),
    ("INSERT", "INSERT INTO otel_t VALUES (1, 'a'), (2, 'b')"),
    ("SELECT", "SELECT name FROM otel_t WHERE id = 1"),
    ("UPDATE", "UPDATE otel_t SET name = 'c' WHERE id = 2"),
    ("DELETE", "DELETE FROM otel_t WHERE id = 1"),
    ("SELECT", "WITH x AS (SELECT 1) SELECT * FROM x"),
]


def query_counts(registry: CollectorRegistry, pool: str) -> dict[str, float]:
    return {
        labels["operation"]: value
        for (name, labels), value in scrape(registry).items()
        if name == "poolwatch_query_seconds_count" and labels["pool"] == pool
    }


def check_one_span_per_statement(exporter: InMemorySpanExporter, before: dict[str, float],
                                 after: dict[str, float]) -> None:  # fmt: skip
    found = statement_spans(exporter)
    assert [s.attributes[OPERATION_ATTRIBUTE] for s in found] == [op for op, _ in STATEMENTS]
    assert all(s.kind == trace.SpanKind.CLIENT for s in found)
    assert not [s for s in exporter.get_finished_spans() if s.name == "connect"]
    # The spans and poolwatch_query_seconds count the same statements.
    for operation in {op for op, _ in STATEMENTS}:
        expected = sum(1 for op, _ in STATEMENTS if op == operation)
        assert after[operation] - before.get(operation, 0) == expected, operation


def test_one_span_per_statement_sync(
    spans: InMemorySpanExporter, sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0)
    watch = poolwatch.watch(engine, registry=registry, name="traced", tracing=True)
    # Watching it again (another registry) must not add a second tracer.
    again = poolwatch.watch(engine, registry=CollectorRegistry(), tracing=True)
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))  # first connect: dialect initialisation
    spans.clear()
    before = query_counts(registry, "traced")
    with engine.begin() as connection:
        for _, statement in STATEMENTS:
            connection.execute(sa.text(statement))
    check_one_span_per_statement(spans, before, query_counts(registry, "traced"))
    span = statement_spans(spans)[2]
    assert span.attributes["db.system"] == "postgresql"
    again.close()
    watch.close()
    # Tracing off again: no ConnectionEvents listener is left to slow statements down.
    assert len(engine.dispatch.before_cursor_execute) == 0
    assert len(engine.dispatch.after_cursor_execute) == 0
    engine.dispose()


async def test_one_span_per_statement_async(
    spans: InMemorySpanExporter, async_url: str, registry: CollectorRegistry
) -> None:
    engine = create_async_engine(async_url, pool_size=1, max_overflow=0)
    watch = poolwatch.watch(engine, registry=registry, name="traced_async", tracing=True)
    async with engine.connect() as connection:
        await connection.execute(sa.text("SELECT 1"))
    spans.clear()
    before = query_counts(registry, "traced_async")
    async with engine.begin() as connection:
        for _, statement in STATEMENTS:
            await connection.execute(sa.text(statement))
    check_one_span_per_statement(spans, before, query_counts(registry, "traced_async"))
    watch.close()
    await engine.dispose()


def test_tracing_is_off_by_default(
    spans: InMemorySpanExporter, sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0)
    watch = poolwatch.watch(engine, registry=registry, name="untraced")
    assert len(engine.dispatch.before_cursor_execute) == 0
    # Off means off: work inside the application's own span leaves no exemplar and no span.
    spans.clear()
    with trace.get_tracer("tests").start_as_current_span("request"), engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
    assert exemplars(registry, "poolwatch_query_seconds") == []
    assert exemplars(registry, "poolwatch_use_seconds") == []
    assert statement_spans(spans) == []
    watch.close()
    engine.dispose()


# -- exemplars ------------------------------------------------------------------------------------


def exemplars(registry: CollectorRegistry, metric: str) -> list[tuple[dict[str, str], Any]]:
    text = generate_openmetrics(registry).decode()
    return [
        (sample.labels, sample.exemplar)
        for family in parse_openmetrics(text)
        for sample in family.samples
        if sample.name == f"{metric}_bucket" and sample.exemplar is not None
    ]


def test_collector_attaches_recorded_exemplars_to_their_bucket(
    sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0)
    watch = poolwatch.watch(engine, registry=registry, name="ex")
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
    recorder = watch.recorders[0]
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    recorder.query_exemplars["SELECT"] = (trace_id, 0.003, time.time())
    recorder.use_exemplars[("<none>", "<none>")] = (trace_id, 0.2, time.time())
    query = exemplars(registry, "poolwatch_query_seconds")
    assert [(labels["operation"], labels["le"]) for labels, _ in query] == [("SELECT", "0.005")]
    assert query[0][1].labels == {"trace_id": trace_id}
    assert query[0][1].value == pytest.approx(0.003)
    use = exemplars(registry, "poolwatch_use_seconds")
    assert [(labels["route"], labels["le"]) for labels, _ in use] == [("<none>", "0.25")]
    watch.close()
    engine.dispose()


def test_exemplars_carry_the_active_trace_id(
    spans: InMemorySpanExporter, sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0)
    watch = poolwatch.watch(engine, registry=registry, name="exemplary", tracing=True)
    tracer = trace.get_tracer("tests")
    try:
        with tracer.start_as_current_span("request") as span:
            trace_id = format(span.get_span_context().trace_id, "032x")
            with engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
        for metric, label in (("poolwatch_query_seconds", "operation"),
                              ("poolwatch_use_seconds", "route")):  # fmt: skip
            found = exemplars(registry, metric)
            assert found, f"no exemplar on {metric}"
            for labels, exemplar in found:  # every statement and the checkout ran in that span
                assert exemplar.labels == {"trace_id": trace_id}, metric
                assert labels["pool"] == "exemplary" and label in labels
    finally:
        watch.close()
        engine.dispose()


# -- the metrics bridge ---------------------------------------------------------------------------


def bridge_values(reader: InMemoryMetricReader) -> dict[tuple[str, frozenset[tuple[str, Any]]], Any]:
    data = reader.get_metrics_data()
    assert data is not None
    values: dict[tuple[str, frozenset[tuple[str, Any]]], Any] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            if scope.scope.name != "poolwatch":
                continue
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    key = (metric.name, frozenset(point.attributes.items()))
                    values[key] = point
    return values


def point(values: dict[Any, Any], name: str, **attributes: str) -> Any:
    wanted = {"db.client.connection.pool.name": "bridged"}
    wanted.update({k.replace("_", "."): v for k, v in attributes.items()})
    return values[(name, frozenset(wanted.items()))]


def test_bridge_agrees_with_metrics(sync_url: str, registry: CollectorRegistry) -> None:
    engine = sa.create_engine(sync_url, pool_size=2, max_overflow=1, pool_timeout=0.2)
    watch = poolwatch.watch(engine, registry=registry, name="bridged")
    reader = InMemoryMetricReader()
    bridge = otel_bridge(watch, MeterProvider(metric_readers=[reader]))
    assert bridge is not None
    held = [engine.connect() for _ in range(3)]
    with pytest.raises(sa.exc.TimeoutError):
        engine.connect()
    held.pop().close()
    extra = engine.connect()  # the pool is full again
    # One more caller waits behind the pool, so pending is 1 while both are read.
    waiter_done = threading.Event()
    release = threading.Event()

    def wait_for_a_connection() -> None:
        with engine.connect():
            waiter_done.set()
            release.wait(5)

    slow_engine_timeout = engine.pool._timeout  # type: ignore[attr-defined]
    engine.pool._timeout = 30  # type: ignore[attr-defined]
    waiter = threading.Thread(target=wait_for_a_connection)
    waiter.start()
    try:
        wait_until(
            lambda: scrape(registry).value("poolwatch_pending_requests", pool="bridged") == 1,  # type: ignore[attr-defined]
            10,
            "the waiter never showed up as pending",
        )
        prometheus = scrape(registry)
        otel = bridge_values(reader)
        for state in ("used", "idle"):
            assert point(
                otel, "db.client.connection.count", db_client_connection_state=state
            ).value == prometheus.value("poolwatch_connections", pool="bridged", state=state)  # type: ignore[attr-defined]
        assert (
            point(otel, "db.client.connection.max").value
            == prometheus.value("poolwatch_connections_max", pool="bridged")
            == 3
        )  # type: ignore[attr-defined]
        assert (
            point(otel, "db.client.connection.pending_requests").value
            == prometheus.value("poolwatch_pending_requests", pool="bridged")
            == 1
        )  # type: ignore[attr-defined]
        assert (
            point(otel, "db.client.connection.timeouts").value
            == prometheus.total("poolwatch_timeouts_total", pool="bridged")
            == 1
        )  # type: ignore[attr-defined]
        wait = point(otel, "db.client.connection.wait_time")
        assert wait.count == prometheus.value("poolwatch_wait_seconds_count", pool="bridged")  # type: ignore[attr-defined]
        assert wait.sum == pytest.approx(
            prometheus.value("poolwatch_wait_seconds_sum", pool="bridged"), rel=1e-6
        )  # type: ignore[attr-defined]
        assert point(otel, "db.client.connection.create_time").count == prometheus.value(
            "poolwatch_connect_seconds_count", pool="bridged"
        )  # type: ignore[attr-defined]
    finally:
        extra.close()
        assert waiter_done.wait(5)
        release.set()
        waiter.join()
        engine.pool._timeout = slow_engine_timeout  # type: ignore[attr-defined]
        for connection in held:
            connection.close()
    # A second collection reports only what happened since, on top of the first (cumulative).
    otel = bridge_values(reader)
    prometheus = scrape(registry)
    assert point(otel, "db.client.connection.use_time").count == sum(
        value for (name, labels), value in prometheus.items()
        if name == "poolwatch_use_seconds_count" and labels["pool"] == "bridged"
    )  # fmt: skip
    watch.close()
    engine.dispose()


def test_spread_keeps_bucket_counts_and_the_sum() -> None:
    bounds = [0.001, 0.01, 0.1, 1.0]
    counts = [3, 0, 2, 1, 1]  # the last bucket is +Inf
    values = [0.0005, 0.0002, 0.0009, 0.05, 0.09, 0.5, 7.0]
    placed = spread(bounds, counts, sum(values))
    assert sum(value * count for value, count in placed) == pytest.approx(sum(values))
    buckets = [0] * 5
    for value, count in placed:
        index = next((i for i, bound in enumerate(bounds) if value <= bound), len(bounds))
        buckets[index] += count
    assert buckets == counts


# -- tracing without the otel extra ----------------------------------------------------------------

# Run in a fresh interpreter where the otel extra's packages cannot be imported, as in an app that
# has FastAPI (which brings opentelemetry-api) but not poolwatch[otel]: a meta-path finder refuses
# the instrumentation and SDK packages before anything else is imported.
_WITHOUT_THE_EXTRA = """
import json, os, sys

class _NotInstalled:
    blocked = ("opentelemetry.instrumentation", "opentelemetry.sdk")

    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in self.blocked):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())

import opentelemetry.trace  # the API alone is importable, as FastAPI installs it
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

import poolwatch

engine = sa.create_engine(os.environ["DATABASE_URL"], pool_size=1)
app = FastAPI()

@app.get("/one")
def one() -> int:
    with engine.connect() as connection:
        return connection.execute(sa.text("SELECT 1")).scalar_one()

result = {}
try:
    if sys.argv[1] == "watch":
        poolwatch.watch(engine, registry=CollectorRegistry())  # tracing from POOLWATCH_TRACING
    elif sys.argv[1] == "instrument-then-add":  # engines added in the lifespan, the FastAPI way
        watch = poolwatch.instrument(app, registry=CollectorRegistry(), tracing=True)
        watch.add(engine)
    else:
        poolwatch.instrument(app, engine, registry=CollectorRegistry())
    result["started"] = True
    with TestClient(app) as client:
        result["status"] = client.get("/one").status_code
except Exception as error:
    result["error"] = f"{type(error).__name__}: {error}"
engine.dispose()
print(json.dumps(result))
"""


def _run_without_the_extra(how: str, sync_url: str, **environment: str) -> dict[str, Any]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.upper().startswith(("POOLWATCH_", "PROMETHEUS_MULTIPROC", "OTEL_"))
    }
    env.update(environment, DATABASE_URL=sync_url)
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_THE_EXTRA, how], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


@pytest.mark.parametrize(
    ("how", "environment"),
    [("watch", {"POOLWATCH_TRACING": "true"}), ("instrument-then-add", {})],
    ids=["watch with POOLWATCH_TRACING", "instrument(app, tracing=True) with no engine yet"],
)
def test_tracing_without_the_extra_fails_at_start_naming_the_extra(
    sync_url: str, how: str, environment: dict[str, str]
) -> None:
    answer = _run_without_the_extra(how, sync_url, **environment)
    assert "started" not in answer, answer
    error = answer["error"]
    assert error.startswith("ImportError: poolwatch: setting tracing (POOLWATCH_TRACING)"), error
    assert "pip install 'poolwatch[otel]'" in error
    assert "opentelemetry.instrumentation" in error  # what could not be imported


def test_without_the_extra_and_without_tracing_poolwatch_works(sync_url: str) -> None:
    # The blocker itself is checked by the test above; here the app starts and answers.
    assert _run_without_the_extra("instrument", sync_url) == {"started": True, "status": 200}
