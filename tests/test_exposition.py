"""poolwatch's direct writer against prometheus_client's encoders: the same samples, every format."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.pool import NullPool

import poolwatch
from poolwatch._record.context import RequestContext, current_request
from poolwatch._serve.exposition import render

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def samples_of(families):  # type: ignore[no-untyped-def]
    found = {}
    for family in families:
        for sample in family.samples:
            exemplar = None
            if sample.exemplar is not None:
                exemplar = (dict(sample.exemplar.labels), sample.exemplar.value)
            found[(sample.name, frozenset(sample.labels.items()))] = (sample.value, exemplar)
    return found


@pytest.fixture
def busy_registry(sync_url: str, registry: CollectorRegistry):  # type: ignore[no-untyped-def]
    """Two pools (one with awkward characters in its name, one unbounded), routes, errors, exemplars."""
    bounded = sa.create_engine(sync_url, pool_size=2)
    unbounded = sa.create_engine(sync_url, poolclass=NullPool)
    watch = poolwatch.watch({'we"ird\\pool\nname': bounded, "null": unbounded}, registry=registry)
    Counter("app_orders", "An application metric beside poolwatch's.", registry=registry).inc(3)
    for route in ("/users/{user_id}", "/orders/{order_id}", '/a"quoted\\route', "/off/100%d%%s"):
        token = current_request.set(RequestContext({"type": "http", "method": "GET", "route": None}))
        current_request.get().resolved_route = route  # type: ignore[union-attr]
        try:
            for engine in (bounded, unbounded):
                with engine.connect() as connection:
                    connection.execute(sa.text("SELECT 1"))
            watch.requests.request_finished((route, "GET"), 3)
        finally:
            current_request.reset(token)
    with bounded.connect() as connection, pytest.raises(sa.exc.ProgrammingError):
        connection.execute(sa.text("SELECT * FROM no_such_table_exposition"))
    recorder = watch.recorders[0]
    recorder.use_exemplars[("/users/{user_id}", "GET")] = (
        "0af7651916cd43dd8448eb211c80319c",
        0.003,
        time.time(),
    )
    recorder.query_exemplars["SELECT"] = ("4bf92f3577b34da6a3ce929d0e0e4736", 0.0002, time.time())
    yield registry, watch
    bounded.dispose()
    unbounded.dispose()


def test_text_output_matches_prometheus_client(busy_registry) -> None:  # type: ignore[no-untyped-def]
    registry, watch = busy_registry
    general = samples_of(text_string_to_metric_families(generate_latest(registry).decode()))
    direct_body = render(registry, None, None, watch.direct_collector).body.decode()
    direct = samples_of(text_string_to_metric_families(direct_body))
    assert direct == general
    assert ("app_orders_total", frozenset()) in direct  # other collectors are still served
    assert len([k for k in direct if k[0] == "poolwatch_use_seconds_bucket"]) >= 3 * 2 * 19


def test_openmetrics_output_matches_prometheus_client(busy_registry) -> None:  # type: ignore[no-untyped-def]
    registry, watch = busy_registry
    general = samples_of(parse_openmetrics(generate_openmetrics(registry).decode()))
    rendered = render(registry, OPENMETRICS, None, watch.direct_collector)
    assert rendered.content_type.startswith("application/openmetrics-text")
    direct = samples_of(parse_openmetrics(rendered.body.decode()))
    assert direct == general
    exemplars = [e for _, e in direct.values() if e is not None]
    assert {e[0]["trace_id"] for e in exemplars} == {
        "0af7651916cd43dd8448eb211c80319c",
        "4bf92f3577b34da6a3ce929d0e0e4736",
    }
    assert rendered.body.endswith(b"# EOF\n") and rendered.body.count(b"# EOF") == 1


def test_a_failing_direct_write_falls_back_to_the_general_encoder(  # type: ignore[no-untyped-def]
    busy_registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, watch = busy_registry
    import poolwatch._serve.exposition as exposition

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("injected")

    monkeypatch.setattr(exposition, "write", broken)
    body = render(registry, None, None, watch.direct_collector).body.decode()
    assert samples_of(text_string_to_metric_families(body)) == samples_of(
        text_string_to_metric_families(generate_latest(registry).decode())
    )
