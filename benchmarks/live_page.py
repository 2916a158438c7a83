"""Cost of the live page's JSON (``/poolwatch/state``) for 3 pools x 50 routes x 100 live checkouts.

The recorders are filled through real traffic: three engines (SQLite files, so that 300
connections can be out at once without a server's connection limit), checkouts made inside 50
route templates as the middleware would attribute them, per-request query counts, and a full ring
of recent events. Then 100 connections per pool are taken and held, each under a request of its
own, and the answer the page fetches every second is built again and again: the builder and the
JSON encoding, exactly what ``LivePage.answer("state", ...)`` does.

    python benchmarks/live_page.py [--iterations 500]

The goal is 2 ms per answer on the machine that runs it; the report says what it measured. Nothing
here runs on the application's hot path: the page costs only while it is open.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import sqlalchemy as sa
from _common import print_header, table
from prometheus_client import CollectorRegistry
from render import endpoint, route_templates
from starlette.routing import Route

import poolwatch
from poolwatch._record.context import RequestContext, current_request
from poolwatch._record.events import RECENT_EVENTS_KEPT, LeakDetected, SlowQuery, emit, set_sinks
from poolwatch._record.intervals import LONG_ROW_INTERVALS, LONG_ROWS, RECENT_ROWS, sampler
from poolwatch._serve.page import LivePage

POOLS = ("primary", "replica", "analytics")
ROUTES = 50
LIVE_PER_POOL = 100
TARGET_MS = 2.0


def contexts() -> list[RequestContext]:
    """One request per route template, routed as Starlette would route it."""
    made = []
    for template in route_templates(ROUTES):
        scope = {"type": "http", "method": "GET", "route": Route(template, endpoint)}
        made.append(RequestContext(scope))
    return made


def fill(engines: dict[str, sa.Engine], watch: poolwatch.PoolWatch, requests: list[RequestContext]) -> None:
    """Returned checkouts on every route of every pool, query counts, and a full ring of events."""
    for number, context in enumerate(requests):
        token = current_request.set(context)
        try:
            for engine in engines.values():
                for _ in range(3):
                    with engine.connect() as connection:
                        connection.exec_driver_sql("SELECT 1")
        finally:
            current_request.reset(token)
        for queries in (1, 2, 3, 5, 8, 13):
            watch.requests.request_finished((context.route, "GET"), queries + number % 7)
    previous = set_sinks([])  # kept for the page, not logged: the report stays readable
    try:
        for n in range(RECENT_EVENTS_KEPT):
            pool = POOLS[n % len(POOLS)]
            if n % 2:
                emit(SlowQuery(pool, "/api/v1/users", "SELECT", 1.5, 1.0, "SELECT * FROM users WHERE id = ?"))
            else:
                emit(LeakDetected(pool, "/api/v1/orders", 31.0, 30.0, "app/orders.py:42", "create_order"))
    finally:
        set_sinks(previous)


def hold(engines: dict[str, sa.Engine], requests: list[RequestContext], stack: ExitStack) -> None:
    """100 connections out per pool, spread over the routes, each under its request."""
    for engine in engines.values():
        for i in range(LIVE_PER_POOL):
            token = current_request.set(requests[i % len(requests)])
            try:
                stack.enter_context(engine.connect())
            finally:
                current_request.reset(token)


def prefill_history(page: LivePage) -> None:
    """A full history per pool, as a pool watched for hours has: the recent ring and the long ring
    filled with copies of one sampled row, an interval apart, so each answer carries all of it."""
    for recorder in page.watch.recorders:
        intervals = sampler.of(recorder)
        assert intervals is not None
        row = intervals.sample(recorder)
        long_row = row._replace(seconds=row.seconds * LONG_ROW_INTERVALS, intervals=LONG_ROW_INTERVALS)
        for back in range(LONG_ROWS, 0, -1):
            intervals.add(long_row._replace(end=row.end - back * long_row.seconds))
        for back in range(RECENT_ROWS, 0, -1):
            intervals.add(row._replace(end=row.end - back * sampler.interval))


def measure(page: LivePage, iterations: int, cold: bool) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU seconds per answer. Warm: read after read, as a page open on the same
    held connections and events sees it. Cold: everything reused between reads dropped first,
    as when every checkout, event and history sample is new since the last read."""
    for _ in range(20):
        page.answer("state", "GET")  # warm up
    wall, cpu = [], []
    for _ in range(iterations):
        if cold:
            page.builder.forget()
        started, started_cpu = time.perf_counter(), time.thread_time()
        rendered = page.answer("state", "GET")
        cpu.append(time.thread_time() - started_cpu)
        wall.append(time.perf_counter() - started)
        assert rendered.status == 200
    return wall, cpu


def row(label: str, wall: list[float], cpu: list[float]) -> list[str]:
    ms = sorted(t * 1e3 for t in wall)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    median = statistics.median(ms)
    return [
        label, f"{median:.2f}", f"{p95:.2f}", f"{ms[0]:.2f}", f"{statistics.median(cpu) * 1e3:.2f}",
        "yes" if median <= TARGET_MS else "NO",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=500)
    args = parser.parse_args()
    print_header("Live page: building /poolwatch/state")
    registry = CollectorRegistry()
    with tempfile.TemporaryDirectory() as directory, ExitStack() as stack:
        engines = {
            name: sa.create_engine(
                f"sqlite:///{Path(directory) / name}.db", pool_size=LIVE_PER_POOL, max_overflow=0
            )
            for name in POOLS
        }
        watch = poolwatch.watch(engines, registry=registry, ui="always", leak_threshold_seconds=30)
        requests = contexts()
        fill(engines, watch, requests)
        hold(engines, requests, stack)
        page = LivePage(watch)
        body = page.answer("state", "GET").body
        prefill_history(page)
        body = page.answer("state", "GET").body
        results = {
            "warm: read after read": measure(page, args.iterations, cold=False),
            "cold: nothing reused from the last read": measure(page, args.iterations, cold=True),
        }
        kept_intervals = sampler.of(watch.recorders[0])
        kept = len(kept_intervals.recent) + len(kept_intervals.long) if kept_intervals is not None else 0
        stack.close()
        watch.close()
        for engine in engines.values():
            engine.dispose()
    print(
        f"\n{len(POOLS)} pools x {ROUTES} routes x {LIVE_PER_POOL} live checkouts per pool, "
        f"{RECENT_EVENTS_KEPT} recent events, {kept} rows of history per pool; answer "
        f"{len(body):,} bytes of JSON; {args.iterations} answers each. Goal: {TARGET_MS:.0f} ms.\n"
    )
    rows = [row(label, wall, cpu) for label, (wall, cpu) in results.items()]
    header = [
        "answer (builder + JSON)",
        "median ms",
        "p95 ms",
        "min ms",
        "CPU median ms",
        "median within goal",
    ]
    print(table(header, rows))


if __name__ == "__main__":
    main()
