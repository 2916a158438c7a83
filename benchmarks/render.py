"""Cost of a scrape: rendering ``/metrics`` for 3 pools x 50 routes, and the event loop it holds.

The recorders are filled through the public API with real traffic: three engines on PostgreSQL,
checkouts made inside 50 route templates (``poolwatch._record.context.current_request``, as the middleware
sets it), statements of every kind, and per-request query counts. Then:

1. the render itself, in-process, as the middleware does it (``poolwatch._serve.exposition.render``):
   text and OpenMetrics, each plain and gzipped (Prometheus asks for gzip), with the collector's
   share (``registry.collect()``) reported separately from the encoder's;
2. the same app served by uvicorn (uvloop) in this process, a ticker task on its event loop, and
   wrk (a separate process, one connection) scraping back to back: the longest gap between ticks
   is how long one scrape holds the loop, i.e. how long every other request has to wait.

    python benchmarks/render.py                   # PostgreSQL at POOLWATCH_TEST_DATABASE_URL or 127.0.0.1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gzip
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import uvicorn
from _common import (
    database_url_from_env,
    free_port,
    print_header,
    table,
    throwaway_database,
    with_driver,
)
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import poolwatch
from poolwatch._record.context import RequestContext, current_request
from poolwatch._serve.exposition import render

POOLS = ("primary", "replica", "analytics")
TARGET_MS = 2.0
# Event-loop gaps longer than this (beyond the ticker's own interval) count as stalls.
STALL = 0.002
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;"
    "version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)
FORMATS: dict[str, tuple[str | None, str | None]] = {
    "text": (None, None),
    "text, gzip": (None, "gzip"),
    "OpenMetrics": ("application/openmetrics-text; version=1.0.0", None),
    "OpenMetrics, gzip (what Prometheus asks for)": (PROMETHEUS_ACCEPT, "gzip"),
}
STATEMENTS = (
    "SELECT 1",
    "INSERT INTO t (v) VALUES (1)",
    "UPDATE t SET v = v + 1",
    "DELETE FROM t WHERE v > 1000000",
    "BEGIN",
    "COMMIT",
)


def route_templates(count: int = 50) -> list[str]:
    """50 plausible templates of a mid-sized service (the label values of ``route``)."""
    nouns = ("users", "orders", "invoices", "products", "carts", "reviews", "shipments",
             "payments", "coupons", "accounts")  # fmt: skip
    shapes = ("/api/v1/{n}", "/api/v1/{n}/{{id}}", "/api/v1/{n}/{{id}}/items",
              "/api/v1/{n}/{{id}}/items/{{item_id}}", "/api/v1/{n}/search")  # fmt: skip
    return [shape.format(n=noun) for noun in nouns for shape in shapes][:count]


def endpoint(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def fill(engines: dict[str, sa.Engine], watch: poolwatch.PoolWatch, checkouts: int) -> None:
    """Real checkouts and statements on every pool, attributed to each of the 50 routes."""
    for engine in engines.values():
        with engine.begin() as connection:
            connection.execute(sa.text("CREATE TABLE IF NOT EXISTS t (v int)"))
    for number, template in enumerate(route_templates()):
        route = Route(template, endpoint)
        context = RequestContext({"type": "http", "route": route})
        token = current_request.set(context)
        try:
            for engine in engines.values():
                for i in range(checkouts):
                    with engine.connect() as connection:
                        connection.exec_driver_sql(STATEMENTS[(number + i) % len(STATEMENTS)])
                        connection.commit()
        finally:
            current_request.reset(token)
        for queries in (1, 2, 3, 5, 8, 13):
            watch.requests.request_finished((template, "GET"), queries + number % 7)


def series_count(body: bytes) -> int:
    return sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))


def time_renders(
    registry: CollectorRegistry, iterations: int, watch: poolwatch.PoolWatch | None = None
) -> dict[str, list[float]]:
    """Seconds per render, by case; the cases take turns, so a slow moment hits them all alike."""
    direct = watch.direct_collector if watch is not None else None
    # What the middleware does: poolwatch's families written directly, the rest by prometheus_client.
    cases: dict[str, Callable[[], object]] = {
        name: functools.partial(render, registry, accept, encoding, direct)
        for name, (accept, encoding) in FORMATS.items()
    }
    # Before the direct writer: every family through prometheus_client's encoders.
    for name in ("text", "OpenMetrics, gzip (what Prometheus asks for)"):
        accept, encoding = FORMATS[name]
        cases[f"{name}, all through prometheus_client (before)"] = functools.partial(
            render, registry, accept, encoding
        )
    cases["collector only (registry.collect())"] = lambda: [metric for metric in registry.collect()]
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for call in cases.values():
        call()  # warm up
    for _ in range(iterations):
        for name, call in cases.items():
            started = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - started)
    return samples


def profile_renders(registry: CollectorRegistry, accept: str | None, count: int) -> None:
    """Where a render's time goes: cProfile (stdlib, no extra package), top entries by own time.

    A deterministic profiler inflates small functions, so read shares, not absolute times; the
    total at the top is the profiled time of ``count`` renders.
    """
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(count):
        render(registry, accept, None)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt  # type: ignore[attr-defined]
    entries = sorted(
        stats.stats.items(),  # type: ignore[attr-defined]
        key=lambda item: item[1][2],
        reverse=True,
    )[:14]
    rows = []
    for (filename, line, function), (_, calls, own, cumulative, _) in entries:
        where = filename.split("site-packages/")[-1].split("/work/main/")[-1]
        rows.append([
            f"`{where}:{line} {function}`", f"{calls:,}", f"{own / count * 1e3:.2f}",
            f"{own / total:.0%}", f"{cumulative / count * 1e3:.2f}",
        ])  # fmt: skip
    print(f"\nprofiled: {total / count * 1e3:.1f} ms per render (under cProfile)\n")
    print(table(["function", "calls", "own ms/render", "share", "cumulative ms/render"], rows))


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Ticker:
    """Wakes every ``interval`` seconds on the event loop and keeps the gaps between wake-ups."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.gaps: list[float] = []
        self.recording = False

    async def run(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(self.interval)
            now = time.perf_counter()
            if self.recording:
                self.gaps.append(now - last)
            last = now

    def window(self) -> list[float]:
        gaps, self.gaps = self.gaps, []
        return gaps


SCRAPE_LUA = """
function done(summary, latency, requests)
  io.write(string.format('SCRAPES {"requests":%d,"p50_us":%d,"p99_us":%d,"errors":%d}\\n',
    summary.requests, latency:percentile(50), latency:percentile(99),
    summary.errors.status + summary.errors.connect + summary.errors.read))
end
"""


async def scrape_with_wrk(url: str, headers: dict[str, str], seconds: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(SCRAPE_LUA)
    command = ["wrk", "-t1", "-c1", f"-d{seconds}s", "-s", script.name]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    try:
        process = await asyncio.create_subprocess_exec(
            *command, url, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), seconds + 60)
    finally:
        Path(script.name).unlink()
    for line in stdout.decode().splitlines():
        if line.startswith("SCRAPES "):
            result: dict[str, Any] = json.loads(line.removeprefix("SCRAPES "))
            return result
    raise RuntimeError(f"wrk gave no result: {stdout.decode()} {stderr.decode()}")


async def loop_lag(app: Starlette, seconds: int) -> list[list[str]]:
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    ticker = Ticker()
    ticking = asyncio.create_task(ticker.run())
    rows = []
    try:
        while not server.started:
            await asyncio.sleep(0.05)
        scenarios: list[tuple[str, dict[str, str] | None]] = [
            ("idle (no scrape)", None),
            ("text", {}),
            ("OpenMetrics, gzip (Prometheus' request)",
             {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}),
        ]  # fmt: skip
        for name, headers in scenarios:
            ticker.recording = True
            if headers is None:
                await asyncio.sleep(seconds)
                scrapes: dict[str, Any] = {}
            else:
                scrapes = await scrape_with_wrk(f"http://127.0.0.1:{port}/metrics", headers, seconds)
                if scrapes["errors"]:
                    raise RuntimeError(f"scrapes failed: {scrapes}")
            ticker.recording = False
            gaps = ticker.window()
            # A gap is the interval plus however long something else held the loop; a stall is a
            # gap long enough to matter (requests queued behind it).
            stalls = [(gap - ticker.interval) * 1000 for gap in gaps if gap - ticker.interval > STALL]
            count = scrapes.get("requests", 0)
            rows.append([
                name,
                str(count or "-"),
                f"{scrapes['p50_us'] / 1000:.2f}" if scrapes else "-",
                f"{scrapes['p99_us'] / 1000:.2f}" if scrapes else "-",
                str(len(stalls)),
                f"{statistics.median(stalls):.2f}" if stalls else "-",
                f"{max(stalls):.2f}" if stalls else "-",
                f"{sum(stalls) / count:.2f}" if count else "-",
            ])  # fmt: skip
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(serving, 10)
        ticking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticking
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--url", default=database_url_from_env(), help="PostgreSQL server to use")
    parser.add_argument("--iterations", type=int, default=300, help="renders per format")
    parser.add_argument("--checkouts", type=int, default=20, help="per route and pool")
    parser.add_argument("--lag-seconds", type=int, default=5, help="per loop-lag scenario")
    parser.add_argument("--profile", action="store_true", help="cProfile the renders too")
    args = parser.parse_args()

    print_header("poolwatch /metrics render cost (3 pools x 50 routes)")
    with throwaway_database(args.url, "poolwatch_render") as url:
        engines = {
            name: sa.create_engine(with_driver(url, "psycopg"), pool_size=5, max_overflow=5) for name in POOLS
        }
        registry = CollectorRegistry()
        app = Starlette(routes=[Route("/", endpoint)])
        watch = poolwatch.instrument(app, engines, registry=registry)
        try:
            fill(engines, watch, args.checkouts)
            body = render(registry, None, None, watch.direct_collector).body
            om_body = render(registry, FORMATS["OpenMetrics"][0], None, watch.direct_collector).body
            print(
                f"- exposition: {series_count(body)} samples, {len(body) / 1024:.0f} KiB text "
                f"({len(gzip.compress(body, 6)) / 1024:.0f} KiB gzipped), "
                f"{len(om_body) / 1024:.0f} KiB OpenMetrics; "
                f"{sum(1 for line in body.splitlines() if b'_use_seconds_count' in line)} "
                "use_seconds series"
            )
            samples = time_renders(registry, args.iterations, watch)
            print(f"\n## Render, in-process ({args.iterations} iterations each)\n")
            rows = [
                [name, f"{statistics.median(v) * 1e3:.2f}", f"{quantile(v, 0.9) * 1e3:.2f}",
                 f"{max(v) * 1e3:.2f}",
                 "-" if name.startswith("collector") or "(before)" in name else
                 ("met" if statistics.median(v) * 1e3 <= TARGET_MS else "MISSED")]
                for name, v in samples.items()
            ]  # fmt: skip
            print(table(["format", "median ms", "p90 ms", "max ms", f"<= {TARGET_MS:g} ms"], rows))
            if args.profile:
                for name in ("text", "OpenMetrics"):
                    print(f"\n## Profile: {name} render\n")
                    profile_renders(registry, FORMATS[name][0], 20)
            print(f"\n## Event loop held by a scrape under uvicorn ({args.lag_seconds} s each)\n")
            try:
                import uvloop

                lag_rows = uvloop.run(loop_lag(app, args.lag_seconds))
                loop_name = "uvloop"
            except ImportError:
                lag_rows = asyncio.run(loop_lag(app, args.lag_seconds))
                loop_name = "asyncio"
            print(
                table(
                    [
                        "scenario",
                        "scrapes",
                        "scrape p50 ms",
                        "scrape p99 ms",
                        f"loop stalls > {STALL * 1000:g} ms",
                        "stall median ms",
                        "stall max ms",
                        "loop held per scrape ms",
                    ],
                    lag_rows,
                )
            )
            print(
                f"\nA ticker task wakes every 0.5 ms on the server's {loop_name} loop; a stall is a "
                "gap between wake-ups more than 2 ms longer than that, i.e. a stretch in which no "
                "other request could run. wrk scrapes back to back over one connection; the idle "
                "row shows stalls caused by the machine itself (other processes)."
            )
        finally:
            watch.close()
            for engine in engines.values():
                engine.dispose()


if __name__ == "__main__":
    main()
