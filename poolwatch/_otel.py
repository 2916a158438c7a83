"""OpenTelemetry: statement spans (``tracing`` setting) and the metrics bridge (``otel_bridge``).

Spans come from opentelemetry-instrumentation-sqlalchemy's own ``EngineTracer``, attached per
engine, rather than from ``SQLAlchemyInstrumentor().instrument()``, because the instrumentor:

- is a process-wide singleton: a second ``instrument(engine=...)`` call is ignored, so a second
  watched engine would get no spans;
- wraps ``create_engine`` globally, so every engine made afterwards gets its own tracer, and one that
  poolwatch then instruments too would get two spans per statement;
- wraps ``Engine.connect`` with a ``connect`` span (not a statement);
- installs ``checkout``/``checkin``/``connect``/``close`` pool listeners for its
  ``db.client.connections.usage`` metric, which double-counts AsyncEngines and puts listener
  dispatch on the pool hot path poolwatch keeps free of it.

``EngineTracer`` needs no dependency check (the package declares ``sqlalchemy<2.1``; its statement
listeners work on 2.1). Only its three statement listeners are kept. They are ConnectionEvents, which
cost every statement of that engine about 7 us (see ``_dialect_hooks``), hence tracing is opt-in.

The bridge publishes the facts poolwatch already keeps under the OpenTelemetry database client
semantic-convention names, read from the recorders when the SDK collects, never on the hot path.
"""

from __future__ import annotations

import importlib.metadata
import math
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ._capture.sql import operation_of
from ._log import internal_errors, logger
from ._serve.collector import read_pool_state

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Histogram, MeterProvider, Observation
    from opentelemetry.trace import TracerProvider
    from sqlalchemy.engine import Engine

    from ._record.recorder import PoolRecorder, RecorderSnapshot
    from ._serve.watched import Watched

_STATEMENT_EVENTS = ("before_cursor_execute", "after_cursor_execute", "handle_error")
# poolwatch's own operation label on each span, so a span and poolwatch_query_seconds{operation}
# (and its exemplar) name the statement the same way.
OPERATION_ATTRIBUTE = "poolwatch.operation"

Buckets = tuple[list[tuple[str, float]], float]


# -- spans ----------------------------------------------------------------------------------------


class StatementSpans:
    """One engine's statement spans; ``remove()`` takes the listeners off again."""

    def __init__(self, engine: Engine, tracer_provider: TracerProvider | None = None) -> None:
        self._engine_ref = weakref.ref(engine)
        self._tracer: Any = _make_engine_tracer(engine, tracer_provider)

    def remove(self) -> None:
        engine = self._engine_ref()
        if engine is not None:
            self._tracer.remove_listeners(engine)


_spans: weakref.WeakKeyDictionary[Engine, StatementSpans] = weakref.WeakKeyDictionary()
_spans_lock = threading.Lock()


def enable_statement_spans(engine: Engine, tracer_provider: TracerProvider | None = None) -> bool:
    """Give ``engine`` one span per statement; False if it has them already (from anyone)."""
    with _spans_lock:
        if engine in _spans or _instrumentor_traces(engine):
            return False
        _spans[engine] = StatementSpans(engine, tracer_provider)
        return True


def disable_statement_spans(engine: Engine) -> None:
    with _spans_lock:
        spans = _spans.pop(engine, None)
    if spans is not None:
        spans.remove()


def _instrumentor_traces(engine: Engine) -> bool:
    """Whether SQLAlchemyInstrumentor (e.g. ``opentelemetry-instrument``) already traces it."""
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer

    return any(
        ref() is engine and identifier == "before_cursor_execute"
        for ref, identifier, _ in list(EngineTracer._remove_event_listener_params)
    )


def require_tracing() -> None:
    """Fail now, naming the extra, if statement spans cannot be made.

    Called when a PoolWatch with ``tracing`` is made, before anything is hooked: FastAPI brings
    ``opentelemetry-api`` but not the instrumentation packages, so without this check the first
    engine to be traced (often one added in the lifespan) would fail later with a bare
    ModuleNotFoundError from inside poolwatch.
    """
    try:
        _tracing_parts()
    except ImportError as error:
        raise ImportError(
            "poolwatch: setting tracing (POOLWATCH_TRACING) needs OpenTelemetry's SQLAlchemy "
            f"instrumentation, which cannot be imported here ({error}): pip install 'poolwatch[otel]', "
            "or turn tracing off"
        ) from error


def _tracing_parts() -> None:
    """Import what ``_make_engine_tracer`` imports (keep the two lists equal): a missing package or
    a renamed private name of the instrumentation package fails here, at start-up."""
    from opentelemetry.instrumentation._semconv import (  # noqa: F401
        _get_schema_url_for_signal_types,
        _OpenTelemetryStabilitySignalType,
    )
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer  # noqa: F401
    from opentelemetry.instrumentation.sqlalchemy.version import __version__  # noqa: F401
    from opentelemetry.trace import get_tracer  # noqa: F401


def _make_engine_tracer(engine: Engine, tracer_provider: TracerProvider | None) -> Any:
    from opentelemetry.instrumentation._semconv import (
        _get_schema_url_for_signal_types,
        _OpenTelemetryStabilitySignalType,
    )
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
    from opentelemetry.instrumentation.sqlalchemy.version import __version__
    from opentelemetry.trace import get_tracer
    from sqlalchemy import event

    class _StatementTracer(EngineTracer):
        """EngineTracer with its statement listeners only, and poolwatch's operation label."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._listeners: list[tuple[str, Any]] = []
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

        # EngineTracer calls this (a classmethod there) for each listener it wants; an instance
        # method here keeps the statement listeners, drops the pool ones, and remembers what it
        # added so that only poolwatch removes it.
        def _register_event_listener(  # type: ignore[override]
            self, target: Any, identifier: str, func: Any, *args: Any, **kw: Any
        ) -> None:
            if identifier in _STATEMENT_EVENTS:
                event.listen(target, identifier, func, *args, **kw)
                self._listeners.append((identifier, func))

        def remove_listeners(self, target: Any) -> None:
            for identifier, func in self._listeners:
                if event.contains(target, identifier, func):
                    event.remove(target, identifier, func)
            self._listeners.clear()

        def _set_db_client_span_attributes(self, span: Any, statement: Any, db_name: Any, attrs: Any) -> None:
            super()._set_db_client_span_attributes(span, statement, db_name, attrs)
            if isinstance(statement, str):
                span.set_attribute(OPERATION_ATTRIBUTE, operation_of(statement))

    schema_url = _get_schema_url_for_signal_types(
        [_OpenTelemetryStabilitySignalType.DATABASE, _OpenTelemetryStabilitySignalType.HTTP]
    )
    tracer = get_tracer(
        "opentelemetry.instrumentation.sqlalchemy",
        __version__,
        tracer_provider,
        schema_url=schema_url,
    )
    # The usage counter is only fed by the pool listeners, which are never installed.
    return _StatementTracer(tracer, engine, None)


# -- metrics bridge -------------------------------------------------------------------------------


class OtelBridge:
    """Pool facts as OpenTelemetry instruments, read from poolwatch's recorders at collection.

    Gauges and counters are observable instruments. OpenTelemetry has no observable histogram,
    so the four histograms are synchronous ones fed at collection time with what each poolwatch
    histogram gained since the previous collection: the same buckets (exact counts per bucket), with
    values spread inside each bucket so that the sum is exact too.
    """

    def __init__(self, watch: Watched, meter_provider: MeterProvider | None = None) -> None:
        from opentelemetry.metrics import get_meter

        from ._record.histogram import LATENCY_BUCKETS

        self._watch = watch
        self._lock = threading.Lock()
        self._snapshots: list[tuple[PoolRecorder, RecorderSnapshot]] = []
        self._seen: dict[tuple[str, str, str], list[float]] = {}
        self._seen_sums: dict[tuple[str, str, str], float] = {}
        meter = get_meter("poolwatch", _version(), meter_provider)
        # Callbacks run in creation order within one collection: the first one takes the snapshot
        # that the others (and the histogram replay) read.
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            [self._observe_count],
            unit="{connection}",
            description="The number of connections that are currently in the state described by "
            "the state attribute.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.max",
            [self._observe_max],
            unit="{connection}",
            description="The maximum number of open connections allowed.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.pending_requests",
            [self._observe_pending],
            unit="{request}",
            description="The number of current pending requests for an open connection.",
        )
        meter.create_observable_counter(
            "db.client.connection.timeouts",
            [self._observe_timeouts],
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to obtain a "
            "connection from the pool.",
        )

        def histogram(name: str, description: str) -> Histogram:
            return meter.create_histogram(
                name, unit="s", description=description,
                explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
            )  # fmt: skip

        self._create_time = histogram(
            "db.client.connection.create_time", "The time it took to create a new connection."
        )
        self._wait_time = histogram(
            "db.client.connection.wait_time",
            "The time it took to obtain an open connection from the pool.",
        )
        self._use_time = histogram(
            "db.client.connection.use_time",
            "The time between borrowing a connection and returning it to the pool.",
        )
        self._operation_duration = histogram(
            "db.client.operation.duration", "Duration of database client operations."
        )

    # Each callback is guarded: a failure inside poolwatch never reaches the SDK's export loop.

    def _observe_count(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        try:
            self._refresh()
            observations = []
            for recorder, snap in self._snapshots:
                state = read_pool_state(recorder, snap.live.count)
                pool = {"db.client.connection.pool.name": recorder.name}
                observations.append(Observation(state.used, {**pool, "db.client.connection.state": "used"}))
                observations.append(Observation(state.idle, {**pool, "db.client.connection.state": "idle"}))
            return observations
        except Exception as error:
            internal_errors.record("otel_bridge", error)
            return []

    def _observe_max(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        try:
            observations = []
            for recorder, snap in self._snapshots:
                state = read_pool_state(recorder, snap.live.count)
                if state.max is not None:
                    observations.append(Observation(state.max, _pool(recorder)))
            return observations
        except Exception as error:
            internal_errors.record("otel_bridge", error)
            return []

    def _observe_pending(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        return [Observation(max(0, s.pending), _pool(r)) for r, s in self._snapshots]

    def _observe_timeouts(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        return [Observation(sum(s.timeouts.values()), _pool(r)) for r, s in self._snapshots]

    def _refresh(self) -> None:
        with self._lock:
            self._snapshots = [(r, r.snapshot()) for r in self._watch.recorders]
            for recorder, snap in self._snapshots:
                pool = _pool(recorder)
                name = recorder.name
                self._replay(self._create_time, ("create", name, ""), snap.connect_time.cumulative(), pool)
                self._replay(self._wait_time, ("wait", name, ""), snap.wait.cumulative(), pool)
                # OpenTelemetry's use_time has no route: each route's deltas go to the pool's series.
                for (route, method), copy in snap.use.items():
                    self._replay(self._use_time, ("use", name, f"{method} {route}"), copy.cumulative(), pool)
                for operation, copy in snap.query.items():
                    attributes = {
                        **pool,
                        "db.system.name": recorder.dialect,
                        "db.operation.name": operation,
                    }
                    self._replay(
                        self._operation_duration,
                        ("query", name, operation),
                        copy.cumulative(),
                        attributes,
                    )

    def _replay(
        self,
        instrument: Histogram,
        key: tuple[str, str, str],
        cumulative: Buckets,
        attributes: dict[str, str],
    ) -> None:
        buckets, total = cumulative
        counts = [count for _, count in buckets]
        previous = self._seen.get(key, [0.0] * len(counts))
        if len(previous) != len(counts) or counts[-1] < previous[-1]:
            previous = [0.0] * len(counts)  # the histogram started over
        delta_sum = total - self._seen_sums.get(key, 0.0)
        self._seen[key] = counts
        self._seen_sums[key] = total
        bounds = [float(bound) for bound, _ in buckets[:-1]]
        cumulative_delta = [now - before for now, before in zip(counts, previous, strict=True)]
        per_bucket = [int(c - (cumulative_delta[i - 1] if i else 0)) for i, c in enumerate(cumulative_delta)]
        for value, count in spread(bounds, per_bucket, delta_sum):
            for _ in range(count):
                instrument.record(value, attributes)


def spread(bounds: Sequence[float], counts: Sequence[int], total: float) -> list[tuple[float, int]]:
    """One value per non-empty bucket, inside that bucket, so that the values add up to ``total``.

    Bucket ``i`` holds values in ``(bounds[i-1], bounds[i]]``; the last one, ``+Inf``, is unbounded
    above. Finite buckets' values sit at the same fraction of their width; the ``+Inf`` bucket takes
    whatever the finite ones cannot. Rounding only ever moves the sum, never a count.
    """
    edges = [0.0, *bounds]
    finite = [(edges[i], bounds[i], count) for i, count in enumerate(counts[: len(bounds)]) if count > 0]
    overflow = counts[len(bounds)] if len(counts) > len(bounds) else 0
    overflow_low = math.nextafter(bounds[-1], math.inf) if bounds else 0.0
    finite_total = total - overflow * overflow_low
    least = sum(low * count for low, _, count in finite)
    most = sum(high * count for _, high, count in finite)
    fraction = (finite_total - least) / (most - least) if most > least else 1.0
    fraction = min(1.0, max(0.0, fraction))
    values = []
    for low, high, count in finite:
        value = low + fraction * (high - low)
        if low > 0 and value <= low:  # the bucket's lower edge belongs to the bucket below it
            value = math.nextafter(low, math.inf)
        values.append((min(value, high), count))
    if overflow:
        rest = total - sum(value * count for value, count in values)
        values.append((max(overflow_low, rest / overflow), overflow))
    return values


def _version() -> str:
    """poolwatch's version for the meter's scope, from the installed package's metadata (the
    package root is above this module; importing it from here would point up the layers)."""
    try:
        return importlib.metadata.version("poolwatch")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return ""


def _pool(recorder: PoolRecorder) -> dict[str, str]:
    return {"db.client.connection.pool.name": recorder.name}


def otel_bridge(watch: Watched, meter_provider: MeterProvider | None = None) -> OtelBridge:
    """Publish ``watch``'s pools through an OpenTelemetry MeterProvider (the global one by default).

    Instruments: ``db.client.connection.count`` (state=used/idle), ``.max``, ``.pending_requests``,
    ``.timeouts``, ``.create_time``, ``.wait_time``, ``.use_time`` and
    ``db.client.operation.duration``, all with ``db.client.connection.pool.name``.
    """
    bridge = OtelBridge(watch, meter_provider)
    logger.debug("poolwatch.otel_bridge", pools=watch.pool_names)
    return bridge
