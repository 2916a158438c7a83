"""poolwatch's direct writer against prometheus_client's encoders: the same samples, every format."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import time
import uuid

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.pool import NullPool

import poolwatch
import poolwatch._serve.exposition as exposition_module
from poolwatch._record.context import RequestContext, current_request
from poolwatch._serve.exposition import render, serve_metrics

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
    # A name of this run's own: the writer caches each label block and histogram template it
    # builds, so a name seen before (by an earlier test in the process) would not be built again.
    watch = poolwatch.watch(
        {f'we"ird\\pool\nname-{uuid.uuid4().hex[:8]}': bounded, "null": unbounded}, registry=registry
    )
    Counter("app_orders", "An application metric beside poolwatch's.", registry=registry).inc(3)
    routes = ("/users/{user_id}", "/orders/{order_id}", '/a"quoted\\route', "/off/100%d%%s",
              "/ünïcode/{名前}/€", "/new\nline/{id}\\n")  # fmt: skip
    for route in routes:
        token = current_request.set(RequestContext({"type": "http", "method": "GET", "route": None}))
        current_request.get().resolved_route = route  # type: ignore[union-attr]
        try:
            for engine in (bounded, unbounded):
                with engine.connect() as connection:
                    connection.execute(sa.text("SELECT 1"))
            watch.requests.request_finished((route, "GET"), 3)
        finally:
            current_request.reset(token)
    # A request that ran more statements than the largest bucket bound (1024): an observation in
    # the +Inf bucket, so each format's _count must be the +Inf bucket's count, not the one before.
    watch.requests.request_finished(("/bulk/import", "POST"), 5000)
    with bounded.connect() as connection, pytest.raises(sa.exc.ProgrammingError):
        connection.execute(sa.text("SELECT * FROM no_such_table_exposition"))
    recorder = watch.recorders[0]
    recorder.use_exemplars[("/users/{user_id}", "GET")] = (
        "0af7651916cd43dd8448eb211c80319c",
        0.005,  # exactly a bucket's bound: it belongs to that bucket (le), not the next
        time.time(),
    )
    recorder.query_exemplars["SELECT"] = ("4bf92f3577b34da6a3ce929d0e0e4736", 0.00025, time.time())
    # Above every finite bound: it belongs to the +Inf bucket.
    recorder.use_exemplars[("/orders/{order_id}", "GET")] = (
        "5ce0e9a56015fec5aadfa328ae398115",
        1e6,
        time.time(),
    )
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
    # (6 routes + <none>, there from the start) x 2 pools x 19 buckets.
    assert len([k for k in direct if k[0] == "poolwatch_use_seconds_bucket"]) == (6 + 1) * 2 * 19


def test_without_the_direct_writer_the_registry_is_written_whole(busy_registry) -> None:  # type: ignore[no-untyped-def]
    """With no direct collector (a multi-worker service's merged view), the general encoder
    writes the registry as it is: the same samples, the application's own included."""
    registry, _watch = busy_registry
    general = samples_of(text_string_to_metric_families(generate_latest(registry).decode()))
    body = render(registry, None, None, None).body.decode()
    assert samples_of(text_string_to_metric_families(body)) == general
    assert ("app_orders_total", frozenset()) in general


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
        "5ce0e9a56015fec5aadfa328ae398115",
    }
    assert rendered.body.endswith(b"# EOF\n") and rendered.body.count(b"# EOF") == 1
    # Each exemplar keeps the instant it was recorded at (OpenMetrics shows it after the value).
    recorded = {
        trace_id: at
        for recorder in watch.recorders
        for trace_id, _, at in [*recorder.use_exemplars.values(), *recorder.query_exemplars.values()]
    }
    for body in (rendered.body, generate_openmetrics(registry)):  # poolwatch's writer, the general one
        stamped = {
            sample.exemplar.labels["trace_id"]: float(sample.exemplar.timestamp)
            for family in parse_openmetrics(body.decode())
            for sample in family.samples
            if sample.exemplar is not None
        }
        assert stamped.keys() == recorded.keys()
        for trace_id, at in recorded.items():
            assert stamped[trace_id] == pytest.approx(at, abs=1e-3), trace_id
    # Each exemplar on the bucket its value is at or under: both values lie exactly on a bound.
    placed = {
        (name, labels["le"])
        for (name, frozen), (_, exemplar) in direct.items()
        if exemplar is not None
        for labels in [dict(frozen)]
    }
    assert placed == {
        ("poolwatch_use_seconds_bucket", "0.005"),
        ("poolwatch_use_seconds_bucket", "+Inf"),
        ("poolwatch_query_seconds_bucket", "0.00025"),
    }
    # A counter's family is its name without "_total", and its samples are named with it.
    body = rendered.body.decode()
    counters = re.findall(r"^# TYPE (poolwatch_\w+) counter$", body, re.MULTILINE)
    assert "poolwatch_checkouts" in counters and "poolwatch_query_errors" in counters
    for family in counters:
        assert f"# HELP {family} " in body, family
    for family in ("poolwatch_checkouts", "poolwatch_query_errors"):
        assert re.search(rf"^{family}_total{{", body, re.MULTILINE), family


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


# -- promtool: what a real Prometheus accepts ---------------------------------------------------

TEXT_ACCEPTS = [
    None,
    "",
    "*/*",
    "text/plain",
    "text/plain; version=0.0.4",
    "text/html, application/xhtml+xml",
    "application/json",
]


def promtool_check(body: bytes) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: bash scripts/setup.sh test installs Debian's prometheus"
    return subprocess.run(
        [promtool, "check", "metrics"], input=body.decode(), capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("accept", TEXT_ACCEPTS)
def test_the_text_format_passes_promtool_and_never_carries_exemplars(  # type: ignore[no-untyped-def]
    busy_registry, accept: str | None
) -> None:
    registry, watch = busy_registry
    rendered = render(registry, accept, None, watch.direct_collector)
    assert rendered.content_type == "text/plain; version=0.0.4; charset=utf-8"
    # Exemplars were recorded (busy_registry), and the text format has no syntax for them: one
    # there fails the whole scrape ("expected integer as timestamp").
    assert b" # {" not in rendered.body
    assert b"# EOF" not in rendered.body
    checked = promtool_check(rendered.body)
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")
    # The odd label values arrive escaped, as written.
    assert b'pool="we\\"ird\\\\pool\\nname-' in rendered.body
    assert 'route="/ünïcode/{名前}/€"'.encode() in rendered.body
    assert b'route="/new\\nline/{id}\\\\n"' in rendered.body
    assert b'route="/off/100%d%%s"' in rendered.body


def test_a_text_output_with_an_exemplar_fails_promtool() -> None:
    """The check above can fail: promtool rejects the mistake it guards against."""
    body = (
        b'# HELP x_seconds x\n# TYPE x_seconds histogram\nx_seconds_bucket{le="+Inf"} 1 # {trace_id="a"} 1\n'
    )
    checked = promtool_check(body)
    assert checked.returncode == 1 and "parsing error" in checked.stderr


OPENMETRICS_ACCEPTS = [
    OPENMETRICS,
    # What Prometheus 2.x sends when it scrapes with exemplars on.
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "application/openmetrics-text;version=1.0.0, text/plain;version=0.0.4;q=0.5",
]


@pytest.mark.parametrize("accept", OPENMETRICS_ACCEPTS)
def test_the_openmetrics_format_parses_in_promtool_with_its_exemplars(  # type: ignore[no-untyped-def]
    busy_registry, accept: str
) -> None:
    """promtool 2.42's `check metrics` reads the text format's grammar; an OpenMetrics body with
    its exemplars taken off must parse there with no error (exit 3 is lint findings, 1 a parse
    error), and its only findings are that OpenMetrics puts a counter's HELP on its family name.
    The exemplars themselves are checked by prometheus_client's OpenMetrics parser (above) and by
    a real Prometheus scraping OpenMetrics in tests/test_operator_e2e.py."""
    registry, watch = busy_registry
    rendered = render(registry, accept, None, watch.direct_collector)
    assert rendered.content_type.startswith("application/openmetrics-text; version=")
    body = rendered.body
    assert body.endswith(b"# EOF\n") and body.count(b"# EOF") == 1
    exemplar = re.compile(rb" # \{trace_id=\"[0-9a-f]{32}\"\} [0-9.e+-]+ [0-9.]+$", re.MULTILINE)
    assert len(exemplar.findall(body)) == 3
    bare = exemplar.sub(b"", body)
    assert b" # {" not in bare
    checked = promtool_check(bare)
    assert checked.returncode in (0, 3), checked.stderr
    assert "error while linting" not in checked.stderr and "parsing error" not in checked.stderr
    findings = [line for line in checked.stderr.splitlines() if line]
    assert findings and all(line.endswith("no help text") for line in findings), findings
    assert all(line.split()[0].endswith(("_total", "_created")) for line in findings), findings


def test_exemplars_from_real_spans_only_in_openmetrics(sync_url: str, registry: CollectorRegistry) -> None:
    """tracing on, statements run inside a real span: exemplars in OpenMetrics, none in text."""
    from opentelemetry.sdk.trace import TracerProvider

    engine = sa.create_engine(sync_url, pool_size=1)
    watch = poolwatch.watch(engine, registry=registry, name='tr"aced\\', tracing=True)
    tracer = TracerProvider().get_tracer("test_exposition")
    try:
        with tracer.start_as_current_span("request") as span, engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
            trace_id = format(span.get_span_context().trace_id, "032x")
        text = render(registry, None, None, watch.direct_collector).body
        openmetrics = render(registry, OPENMETRICS, None, watch.direct_collector).body
    finally:
        watch.close()
        engine.dispose()
    assert b" # {" not in text
    checked = promtool_check(text)
    assert (checked.returncode, checked.stderr) == (0, "")
    found = samples_of(parse_openmetrics(openmetrics.decode()))
    trace_ids = {e[0]["trace_id"] for _, e in found.values() if e is not None}
    assert trace_ids == {trace_id}


# -- /metrics over ASGI: methods, negotiation, gzip ----------------------------------------------


async def asgi_get(registry: CollectorRegistry, watch: poolwatch.PoolWatch, method: str,
                   headers: list[tuple[bytes, bytes]]) -> tuple[int, dict[bytes, bytes], bytes]:  # fmt: skip
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": "/metrics", "headers": headers}
    await serve_metrics(registry, scope, receive, send, watch.direct_collector)  # type: ignore[arg-type]
    start = sent[0]
    body = b"".join(bytes(m.get("body", b"")) for m in sent[1:])  # type: ignore[call-overload]
    return int(start["status"]), dict(start["headers"]), body  # type: ignore[call-overload]


async def test_metrics_over_asgi_negotiates_compresses_and_refuses_writes(busy_registry) -> None:  # type: ignore[no-untyped-def]
    registry, watch = busy_registry
    plain = render(registry, None, None, watch.direct_collector).body
    status, headers, body = await asgi_get(registry, watch, "GET", [])
    assert (status, headers[b"content-type"], headers[b"vary"]) == (
        200, b"text/plain; version=0.0.4; charset=utf-8", b"Accept, Accept-Encoding",
    )  # fmt: skip
    assert b"content-encoding" not in headers
    assert samples_of(text_string_to_metric_families(body.decode())) == samples_of(
        text_string_to_metric_families(plain.decode())
    )
    # gzip when accepted: the same text, compressed (any gzip reader opens it).
    status, headers, body = await asgi_get(registry, watch, "GET", [(b"accept-encoding", b"gzip, deflate")])
    assert (status, headers[b"content-encoding"]) == (200, b"gzip")
    assert samples_of(text_string_to_metric_families(gzip.decompress(body).decode())) == samples_of(
        text_string_to_metric_families(plain.decode())
    )
    assert len(body) < len(plain) / 5  # compressed for real, not stored
    # OpenMetrics when asked, with its exemplars.
    status, headers, body = await asgi_get(registry, watch, "GET", [(b"accept", OPENMETRICS.encode())])
    assert status == 200 and headers[b"content-type"].startswith(
        b"application/openmetrics-text; version=1.0.0"
    )
    assert body.endswith(b"# EOF\n") and body.count(b" # {") == 3
    # HEAD: the headers, no body. Anything else: 405 naming what is allowed.
    status, headers, body = await asgi_get(registry, watch, "HEAD", [])
    assert (status, body, headers[b"content-type"]) == (200, b"", b"text/plain; version=0.0.4; charset=utf-8")
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        status, headers, body = await asgi_get(registry, watch, method, [])
        assert (status, headers[b"allow"], json.loads(body)) == (
            405, b"GET, HEAD", {"detail": "Method Not Allowed"},
        )  # fmt: skip


@pytest.mark.parametrize("compress", [exposition_module._stdlib_gzip, exposition_module._isal_gzip])
def test_both_compressors_give_gzip_at_level_one(compress) -> None:  # type: ignore[no-untyped-def]
    data = b'poolwatch_connections{pool="p",state="idle"} 1.0\n' * 2000
    packed = compress(data)
    assert gzip.decompress(packed) == data
    # Compressed for real, not stored.
    assert len(packed) < len(data) / 20
    if compress is exposition_module._stdlib_gzip:
        # zlib's level 1 marks its gzip header "fastest" (XFL = 4); the default level does not.
        assert packed[8] == 4
