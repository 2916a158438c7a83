"""Hot-path cost of poolwatch: one checkout + checkin, and one statement, against bare SQLAlchemy.

Every configuration runs in the same process, interleaved round by round in shuffled order, and
the median of the rounds is reported, with each ratio to the uninstrumented pool of the same run.

    python benchmarks/pool_cycle.py                  # PostgreSQL at POOLWATCH_TEST_DATABASE_URL or 127.0.0.1
    python benchmarks/pool_cycle.py --rounds 15 --cycles 20000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import event
from starlette.routing import Route

import poolwatch
from poolwatch._record.context import RequestContext, current_request

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
ROUTE = Route("/users/{user_id}", lambda request: None)


def make_engine(url: str) -> sa.Engine:
    return sa.create_engine(url, pool_size=5, max_overflow=5)


def naive_listeners(engine: sa.Engine) -> None:
    """What a team writes first: prometheus_client objects updated from pool events."""
    registry = CollectorRegistry()
    checkouts = Counter("naive_checkouts", "", registry=registry)
    checkins = Counter("naive_checkins", "", registry=registry)
    used = Gauge("naive_used", "", registry=registry)
    held = Histogram("naive_held_seconds", "", registry=registry)

    @event.listens_for(engine, "checkout")
    def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        checkouts.inc()
        used.inc()
        record.info["naive_started"] = time.perf_counter()

    @event.listens_for(engine, "checkin")
    def on_checkin(dbapi_connection: Any, record: Any) -> None:
        checkins.inc()
        used.dec()
        started = record.info.pop("naive_started", None)
        if started is not None:
            held.observe(time.perf_counter() - started)


def otel_pool_metric(engine: sa.Engine) -> Any:
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    instrumentor = SQLAlchemyInstrumentor()
    # 0.66b1 declares sqlalchemy<2.1; its pool metric works on 2.1, so skip the version check.
    instrumentor.instrument(
        engine=engine,
        meter_provider=provider,
        tracer_provider=TracerProvider(),
        skip_dep_check=True,
    )
    return instrumentor


@contextlib.contextmanager
def multiworker_mode(directory: str, interval: float) -> Iterator[None]:
    """Watch as a gunicorn/uvicorn worker does: publishing snapshots for the other workers."""
    saved = {
        name: os.environ.get(name)
        for name in ("POOLWATCH_MULTIPROC_DIR", "POOLWATCH_MULTIPROC_INTERVAL_SECONDS")
    }
    os.environ["POOLWATCH_MULTIPROC_DIR"] = directory
    os.environ["POOLWATCH_MULTIPROC_INTERVAL_SECONDS"] = str(interval)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def cycle_timer(engine: sa.Engine, in_request: bool) -> Callable[[int], float]:
    pool = engine.pool

    def run(cycles: int) -> float:
        # A request after routing, as every checkout inside an endpoint sees it.
        request = RequestContext({"type": "http", "route": ROUTE})
        token = current_request.set(request) if in_request else None
        try:
            started = time.perf_counter()
            for _ in range(cycles):
                pool.connect().close()
            return (time.perf_counter() - started) / cycles
        finally:
            if token is not None:
                current_request.reset(token)

    return run


def statement_timer(engine: sa.Engine) -> Callable[[int], float]:
    statement = sa.text("SELECT 1")

    def run(cycles: int) -> float:
        with engine.connect() as connection:
            started = time.perf_counter()
            for _ in range(cycles):
                connection.execute(statement)
            return (time.perf_counter() - started) / cycles

    return run


def cursor_execute_timer(engine: sa.Engine) -> Callable[[int], float]:
    """The driver call SQLAlchemy makes per statement, ``dialect.do_execute``, and nothing else.

    With poolwatch that is its timing wrapper around the same call, so the difference is exactly
    what query timing costs per statement, without SQLAlchemy's own ~100 us of statement handling
    (whose noise on a shared VM is larger than the effect) in the measurement.
    """
    connection = engine.raw_connection()
    cursor = connection.cursor()

    def run(cycles: int, _keep: object = connection) -> float:  # keeps the connection checked out
        execute = engine.dialect.do_execute
        started = time.perf_counter()
        for _ in range(cycles):
            execute(cursor, "SELECT 1", (), None)
        return (time.perf_counter() - started) / cycles

    return run


class Result:
    """Median time per operation, and the median of per-round ratios to the baseline.

    Ratios are paired within a round, so drift in the machine's speed between rounds (common on a
    shared VM) cancels out instead of landing on whichever configuration ran during it.
    """

    def __init__(self, samples: dict[str, list[float]], baseline: str) -> None:
        self.baseline = baseline
        self.seconds = {name: statistics.median(values) for name, values in samples.items()}
        self.differences = {
            name: statistics.median(v - b for v, b in zip(values, samples[baseline], strict=True))
            for name, values in samples.items()
        }
        self.ratios = {
            name: statistics.median(v / b for v, b in zip(values, samples[baseline], strict=True))
            for name, values in samples.items()
        }


def measure(timers: dict[str, Callable[[int], float]], rounds: int, cycles: int, baseline: str) -> Result:
    samples: dict[str, list[float]] = {name: [] for name in timers}
    for timer in timers.values():
        timer(max(100, cycles // 10))  # warm up: connections opened, caches filled
    for _ in range(rounds):
        order = list(timers)
        random.shuffle(order)
        for name in order:
            samples[name].append(timers[name](cycles))
    return Result(samples, baseline)


def print_table(title: str, result: Result) -> None:
    print(f"\n{title}")
    print(f"| configuration | us per op (median) | ratio to {result.baseline} (median of rounds) |")
    print("|---|---:|---:|")
    for name, value in result.seconds.items():
        print(f"| {name} | {value * 1e6:.2f} | {result.ratios[name]:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get("POOLWATCH_TEST_DATABASE_URL", DEFAULT_URL))
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--cycles", type=int, default=2000)
    args = parser.parse_args()
    url = args.url.replace("+asyncpg", "+psycopg")

    bare = make_engine(url)
    core = make_engine(url)
    poolwatch.watch(core, registry=CollectorRegistry(), name="core", leak_threshold_seconds=0)
    full = make_engine(url)
    poolwatch.watch(full, registry=CollectorRegistry(), name="full")
    naive = make_engine(url)
    naive_listeners(naive)
    # Multi-worker mode leaves the hot path as it is; what it adds is a thread that collects and
    # writes this worker's snapshot every interval (default 1 s), here also at 20x that rate.
    # (Made before the OpenTelemetry instrumentor runs: it wraps create_engine for every engine.)
    multiproc_dir = tempfile.mkdtemp(prefix="poolwatch-bench-")
    multi = make_engine(url)
    with multiworker_mode(multiproc_dir, 1.0):
        multi_watch = poolwatch.watch(multi, registry=CollectorRegistry(), name="multi")
    multi_fast = make_engine(url)
    with multiworker_mode(multiproc_dir, 0.05):
        poolwatch.watch(multi_fast, registry=CollectorRegistry(), name="multi_fast")
    otel = make_engine(url)
    otel_pool_metric(otel)

    cycle = measure(
        {
            "uninstrumented": cycle_timer(bare, in_request=False),
            "poolwatch, counts only (leak detection off)": cycle_timer(core, in_request=False),
            "poolwatch, route attribution + leak tracking": cycle_timer(full, in_request=True),
            "poolwatch, multi-worker mode (snapshot every 1 s)": cycle_timer(multi, in_request=True),
            "poolwatch, multi-worker mode (snapshot every 0.05 s)": cycle_timer(multi_fast, in_request=True),
            "naive prometheus_client listeners": cycle_timer(naive, in_request=False),
            "opentelemetry-instrumentation-sqlalchemy pool metric": cycle_timer(otel, in_request=False),
        },
        args.rounds,
        args.cycles,
        "uninstrumented",
    )
    print(f"pool checkout + checkin, {url.split('@')[-1]}, {args.rounds} rounds x {args.cycles} cycles")
    print_table("checkout + checkin", cycle)
    # The publisher thread runs beside every configuration above (one process), so its own cost is
    # shown here: one collect + JSON + atomic file write, which it does once per interval.
    publisher = multi_watch._shared.publisher
    assert publisher is not None
    publish_times = []
    for _ in range(200):
        started = time.perf_counter()
        publisher.publish()
        publisher._last = None  # unchanged snapshots are skipped; time the write every time
        publish_times.append(time.perf_counter() - started)
    print(
        f"\nmulti-worker snapshot publish (off the hot path, once per interval): "
        f"{statistics.median(publish_times) * 1e6:.0f} us median"
    )

    # A statement's overhead, on in-memory SQLite so the database's own time does not drown it.
    plain_sqlite = sa.create_engine("sqlite://")
    timed_sqlite = sa.create_engine("sqlite://")
    poolwatch.watch(timed_sqlite, registry=CollectorRegistry(), name="sqlite")
    cursor_execute = measure(
        {
            "uninstrumented": cursor_execute_timer(plain_sqlite),
            "poolwatch query timing": cursor_execute_timer(timed_sqlite),
        },
        args.rounds,
        args.cycles * 5,
        "uninstrumented",
    )
    print_table("cursor execute (dialect.do_execute, SELECT 1, in-memory SQLite)", cursor_execute)
    overhead = cursor_execute.differences["poolwatch query timing"]
    print(f"\nquery timing overhead per statement (median of paired rounds): {overhead * 1e6:.2f} us")
    statement = measure(
        {
            "uninstrumented": statement_timer(plain_sqlite),
            "poolwatch query timing": statement_timer(timed_sqlite),
        },
        args.rounds,
        args.cycles,
        "uninstrumented",
    )
    print_table("a whole statement through SQLAlchemy (connection.execute, same)", statement)


if __name__ == "__main__":
    main()
