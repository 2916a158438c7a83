"""Per-request CPU cost of each configuration, measured in one process, many short paired windows.

The uvicorn + wrk benchmark (``e2e.py``) is the end-to-end truth, but on a small shared VM its
servers start on a different core, at a different moment of a noisy neighbour's load, and the
run-to-run spread (about 10% here) is wider than the 3% it has to resolve. This one keeps the three
apps of ``e2e_app.py`` (each with its own engine and pool) in one process and one event loop and
alternates between them in short windows, shuffled every round, reading the process's CPU time.
Within a round the three windows are seconds apart, so the median of the paired per-round ratios
is a much tighter estimate of what the instrumentation itself costs per request.

Each window calls the app as plain ASGI (no HTTP parsing, which is the same for every
configuration and would only dilute the ratio) with the e2e read-heavy mix, 16 requests at a
time. The peer stack's span exporter thread is flushed inside its own window, so its work is not
billed to another configuration.

    python benchmarks/inprocess.py                # PostgreSQL at POOLWATCH_TEST_DATABASE_URL or 127.0.0.1
    python benchmarks/inprocess.py --rounds 41 --requests 500
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import random
import statistics
import time

from _common import (
    database_url_from_env,
    print_header,
    table,
    throwaway_database,
    with_driver,
)
from e2e_app import CONFIGS, create_app
from fastapi import FastAPI
from memory import drive, requests

from demo_app.settings import DemoSettings

BASELINE = "none"


async def window(app: FastAPI, count: int, workers: int, seed: int) -> tuple[float, float]:
    """CPU seconds and wall seconds per request for ``count`` requests."""
    gc.collect()  # garbage left by the previous window is not this one's to pay for
    stream = requests(seed)
    cpu, wall = time.process_time(), time.perf_counter()
    await drive(app, stream, count, workers)
    app.state.flush_exporters()
    return (time.process_time() - cpu) / count, (time.perf_counter() - wall) / count


async def run(args: argparse.Namespace, url: str) -> None:
    settings = DemoSettings.model_validate(
        {"DATABASE_URL": with_driver(url, "asyncpg"), "POOL_SIZE": 10, "POOL_MAX_OVERFLOW": 10}
    )
    apps = {config: create_app(config, settings) for config in CONFIGS}
    shuffle = random.Random(args.seed)
    cpu: dict[str, list[float]] = {config: [] for config in CONFIGS}
    wall: dict[str, list[float]] = {config: [] for config in CONFIGS}
    profile = ""
    async with contextlib.AsyncExitStack() as stack:
        # The peer stack last: its instrumentor wraps SQLAlchemy's create_engine process-wide once
        # instrumented, and the other apps' engines must be made before that.
        for config in CONFIGS:
            await stack.enter_async_context(apps[config].router.lifespan_context(apps[config]))
        for app in apps.values():
            await window(app, args.warmup, args.workers, seed=1)  # pools filled, caches warm
        for number in range(args.rounds):
            order = list(CONFIGS)
            shuffle.shuffle(order)
            for config in order:
                # The same request sequence for every configuration within a round.
                per_cpu, per_wall = await window(apps[config], args.requests, args.workers, number)
                cpu[config].append(per_cpu)
                wall[config].append(per_wall)

        if args.profile:
            profile = await profile_poolwatch(apps["poolwatch"], args.profile, args.workers)

    print(f"\n## CPU per request, {args.rounds} rounds x {args.requests} requests per configuration\n")
    rows = []
    for config in CONFIGS:
        paired = [v / b for v, b in zip(cpu[config], cpu[BASELINE], strict=True)]
        paired_wall = [v / b for v, b in zip(wall[config], wall[BASELINE], strict=True)]
        quartiles = statistics.quantiles(paired, n=4)
        rows.append([
            config,
            f"{statistics.median(cpu[config]) * 1e6:.0f}",
            f"{(statistics.median(cpu[config]) - statistics.median(cpu[BASELINE])) * 1e6:+.0f}",
            f"{statistics.median(paired):.3f}x",
            f"{quartiles[0]:.3f}-{quartiles[2]:.3f}",
            f"{1 / statistics.median(wall[config]):.0f}",
            f"{1 / statistics.median(paired_wall):.3f}x",
        ])  # fmt: skip
    print(
        table(
            [
                "configuration",
                "CPU us/request (median)",
                "vs none, us",
                "CPU ratio (median of paired)",
                "paired ratio IQR",
                "req/s (wall, in-process)",
                "throughput ratio (paired)",
            ],
            rows,
        )
    )
    print(
        "\nCPU is the whole process's (exporter threads included); throughput is the inverse of "
        "wall time per request with 16 in flight. poolwatch's target: >= 0.97x throughput."
    )
    if profile:
        print(profile)


async def profile_poolwatch(app: FastAPI, count: int, workers: int) -> str:
    """Where poolwatch's own per-request time goes: cProfile, poolwatch's functions only.

    A deterministic profiler inflates every Python call, poolwatch's small hooks included, so the
    shares are an upper bound; the total per request is printed for scale.
    """
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    gc.collect()
    profiler.enable()
    await drive(app, requests(99), count, workers)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt  # type: ignore[attr-defined]
    mine = [
        (key, value)
        for key, value in stats.stats.items()  # type: ignore[attr-defined]
        if "/poolwatch/" in key[0]
    ]
    own_total = sum(value[2] for _, value in mine)
    rows = [
        [f"`{key[0].split('/poolwatch/')[-1]}:{key[1]} {key[2]}`", f"{value[1] / count:.1f}",
         f"{value[2] / count * 1e6:.1f}", f"{value[3] / count * 1e6:.1f}"]
        for key, value in sorted(mine, key=lambda item: item[1][2], reverse=True)[:12]
    ]  # fmt: skip
    return (
        f"\n## Profile of the poolwatch configuration ({count} requests, cProfile)\n\n"
        f"profiled: {total / count * 1e6:.0f} us per request, of which poolwatch's own code "
        f"{own_total / count * 1e6:.1f} us ({own_total / total:.1%})\n\n"
        + table(["poolwatch function", "calls/request", "own us/request", "cumulative us/request"], rows)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--url", default=database_url_from_env(), help="PostgreSQL server to use")
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--requests", type=int, default=400, help="per window")
    parser.add_argument("--warmup", type=int, default=1000, help="per app, before the rounds")
    parser.add_argument("--workers", type=int, default=16, help="concurrent requests")
    parser.add_argument("--seed", type=int, default=None, help="seed for the shuffled order")
    parser.add_argument("--profile", type=int, default=0, help="also cProfile N poolwatch requests")
    args = parser.parse_args()
    print_header("poolwatch per-request cost, in-process paired windows")
    with throwaway_database(args.url, "poolwatch_inproc") as url:
        asyncio.run(run(args, url))


if __name__ == "__main__":
    main()
