"""The demo API in three observability configurations, for the end-to-end overhead benchmark.

``BENCH_CONFIG`` picks the configuration (served by ``benchmarks/e2e.py`` through uvicorn's
``--factory``, so importing this module builds nothing):

- ``none``: the demo API and nothing else;
- ``poolwatch``: ``poolwatch.instrument`` with everything on (route attribution, leak tracking,
  query timing, slow-query log), a leak threshold the run never reaches;
- ``peer``: what a team installs instead: prometheus-fastapi-instrumentator on ``/metrics`` plus
  opentelemetry-instrumentation-sqlalchemy exporting spans and pool metrics through the SDK.

Every configuration shares the demo's engine, session dependency, models and router, and the same
lifespan shape, so the only difference between them is the instrumentation.
"""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

import poolwatch
from demo_app.api import router
from demo_app.db import make_engine
from demo_app.models import Base, Post, User
from demo_app.settings import DemoSettings

CONFIGS = ("none", "poolwatch", "peer")

# The fixed data set: every id the load script asks for exists, so every response is a 2xx and a
# non-2xx in the load generator's report means something broke.
USERS = 200
POSTS_PER_USER = 10

# Everything on; the leak threshold is far beyond any request of the run so no leak is logged,
# and the slow-query threshold is low enough to be a real check yet above any benchmark query.
POOLWATCH_SETTINGS: dict[str, Any] = {"leak_threshold_seconds": 30.0, "slow_query_seconds": 0.25}


def post_id(user_id: int, index: int) -> int:
    """The id of a user's ``index``-th post (0-based), the same in the seed and the load script."""
    return (user_id - 1) * POSTS_PER_USER + index + 1


async def seed(engine: AsyncEngine) -> None:
    """Create the tables and, when they are empty, insert the fixed data set."""
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
        if await connection.scalar(select(func.count()).select_from(User)):
            return
        created = datetime(2026, 1, 1, tzinfo=UTC)
        await connection.execute(
            insert(User),
            [
                {"id": u, "email": f"user{u}@example.com", "name": f"User {u}"} | {"created_at": created}
                for u in range(1, USERS + 1)
            ],
        )
        await connection.execute(
            insert(Post),
            [
                {
                    "id": post_id(u, i),
                    "author_id": u,
                    "title": f"Post {i} by user {u}",
                    "body": "lorem ipsum " * 20,
                    "created_at": created,
                }
                for u in range(1, USERS + 1)
                for i in range(POSTS_PER_USER)
            ],
        )
        if engine.dialect.name == "postgresql":
            # Explicit ids leave the serial sequences behind; a later POST would collide.
            for table in ("users", "posts"):
                await connection.execute(
                    text(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"(SELECT max(id) FROM {table}))"
                    )
                )


class _PeerStack:
    """The OpenTelemetry half of the peer stack, with exporters that count what they are sent.

    Counting (rather than printing or shipping) keeps the exporter's own I/O out of the measurement
    while the SDK still builds, batches and hands over every span and metric point, which is the
    cost the application pays; the counts prove the spans and pool metrics really exist.
    """

    def __init__(self) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import (
            MetricExporter,
            MetricExportResult,
            MetricsData,
            PeriodicExportingMetricReader,
        )
        from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        self.spans = 0
        self.metric_points = 0
        self.pool_metric_names: set[str] = set()
        self._lock = threading.Lock()
        stack = self

        class CountingSpanExporter(SpanExporter):
            def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
                with stack._lock:
                    stack.spans += len(spans)
                return SpanExportResult.SUCCESS

        class CountingMetricExporter(MetricExporter):
            def export(
                self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
            ) -> MetricExportResult:
                points = 0
                names = set()
                for resource in metrics_data.resource_metrics:
                    for scope in resource.scope_metrics:
                        for metric in scope.metrics:
                            names.add(metric.name)
                            points += len(list(metric.data.data_points))
                with stack._lock:
                    stack.metric_points += points
                    stack.pool_metric_names |= names
                return MetricExportResult.SUCCESS

            def force_flush(self, timeout_millis: float = 10_000) -> bool:
                return True

            def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
                return None

        # The SDK's defaults a team would keep: batched spans, metrics exported every 5 s.
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(BatchSpanProcessor(CountingSpanExporter()))
        self.reader = PeriodicExportingMetricReader(CountingMetricExporter(), export_interval_millis=5_000)
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self._instrumentor: Any = None

    def instrument(self, engine: AsyncEngine) -> None:
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

        self._instrumentor = SQLAlchemyInstrumentor()
        # 0.66b1 declares sqlalchemy<2.1 but works on 2.1; the instrumentor wants the sync engine.
        self._instrumentor.instrument(
            engine=engine.sync_engine,
            meter_provider=self.meter_provider,
            tracer_provider=self.tracer_provider,
            skip_dep_check=True,
        )

    def stats(self) -> dict[str, object]:
        self.tracer_provider.force_flush()
        self.reader.collect()
        with self._lock:
            return {
                "spans_exported": self.spans,
                "metric_points_exported": self.metric_points,
                "metric_names": sorted(self.pool_metric_names),
            }

    def shutdown(self) -> None:
        if self._instrumentor is not None:
            self._instrumentor.uninstrument()
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def create_app(config: str, settings: DemoSettings | None = None) -> FastAPI:
    """The demo API in configuration ``config`` (one of :data:`CONFIGS`)."""
    if config not in CONFIGS:
        raise ValueError(f"BENCH_CONFIG must be one of {', '.join(CONFIGS)}, got {config!r}")
    # pydantic-settings fills the fields from the environment, which mypy cannot see.
    settings = settings or DemoSettings()  # type: ignore[call-arg]
    on_engine: Callable[[AsyncEngine], None] = lambda engine: None  # noqa: E731
    on_shutdown: Callable[[AsyncEngine], None] = lambda engine: None  # noqa: E731
    stats: Callable[[], dict[str, object]] = dict
    peer: _PeerStack | None = None
    pool_watch: poolwatch.PoolWatch | None = None

    if config == "peer":
        peer = _PeerStack()
        on_engine = peer.instrument
        on_shutdown = lambda engine: peer.shutdown()  # noqa: E731
        stats = peer.stats

    # on_engine/on_shutdown are read when the lifespan runs, after poolwatch (which needs the app)
    # has been set up below.
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # As in demo_app.main: the engine is made in the lifespan and instrumented there.
        engine = make_engine(settings)
        on_engine(engine)
        await seed(engine)
        app.state.engine = engine
        app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
        try:
            yield
        finally:
            await engine.dispose()
            on_shutdown(engine)

    app = FastAPI(title=f"poolwatch e2e benchmark ({config})", lifespan=lifespan)
    app.include_router(router)
    # Hands the background exporters' pending work to the caller's time window (see inprocess.py).
    app.state.flush_exporters = peer.tracer_provider.force_flush if peer is not None else bool

    # Never requested under load: lets the driver check that the instrumentation really worked.
    @app.get("/bench/stats")
    async def bench_stats() -> dict[str, object]:
        return {"config": config, **stats()}

    if config == "poolwatch":
        pool_watch = poolwatch.instrument(app, registry=CollectorRegistry(), **POOLWATCH_SETTINGS)
        watched = pool_watch

        def add(engine: AsyncEngine) -> None:
            watched.add(engine, name="primary")

        def remove(engine: AsyncEngine) -> None:
            watched.remove(engine)

        on_engine, on_shutdown = add, remove
    elif config == "peer":
        from prometheus_fastapi_instrumentator import Instrumentator

        # The instrumentator's README setup: default metrics, exposed on /metrics.
        Instrumentator().instrument(app).expose(app)
    return app


def create_app_from_env() -> FastAPI:
    """uvicorn factory: ``uvicorn --factory --app-dir benchmarks e2e_app:create_app_from_env``."""
    return create_app(os.environ.get("BENCH_CONFIG", "none"))
