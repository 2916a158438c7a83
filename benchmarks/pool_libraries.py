"""An acquire/release cycle on asyncpg's and psycopg_pool's own pools, watched against bare.

Paired, interleaved wall-clock rounds in one process: each round times the same loop of
acquire + release on a bare pool and on a pool poolwatch watches (alternating which goes first),
and the table shows the median of the per-round ratios. No statement runs: the cycle is the
pool's own work plus poolwatch's hooks, the worst case for the ratio. Target: <= 1.25x.

    .venv/bin/python benchmarks/pool_libraries.py [--url postgresql://...] [--rounds 15] [--cycles 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry

import poolwatch

DEFAULT_URL = os.environ.get("POOLWATCH_BENCH_URL", "postgresql://postgres@127.0.0.1:5432/test")


async def _paired(
    bare: Callable[[int], Awaitable[None]],
    watched: Callable[[int], Awaitable[None]],
    rounds: int,
    cycles: int,
) -> tuple[float, float, float]:
    """(median bare µs per cycle, median watched µs per cycle, median ratio)."""
    await bare(cycles // 10)  # warm up both
    await watched(cycles // 10)
    bare_times, watched_times, ratios = [], [], []
    for round_number in range(rounds):
        order = [(bare, bare_times), (watched, watched_times)]
        if round_number % 2:
            order.reverse()
        took: dict[int, float] = {}
        for loop, times in order:
            started = time.perf_counter()
            await loop(cycles)
            elapsed = (time.perf_counter() - started) / cycles * 1e6
            times.append(elapsed)
            took[id(times)] = elapsed
        ratios.append(took[id(watched_times)] / took[id(bare_times)])
    return statistics.median(bare_times), statistics.median(watched_times), statistics.median(ratios)


async def asyncpg_cycle(url: str, rounds: int, cycles: int) -> tuple[float, float, float]:
    import asyncpg  # type: ignore[import-untyped]

    bare_pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    watched_pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    watch = poolwatch.watch(watched_pool, registry=CollectorRegistry(), name="bench")

    def loop_of(pool: Any) -> Callable[[int], Awaitable[None]]:
        async def loop(n: int) -> None:
            for _ in range(n):
                connection = await pool.acquire()
                await pool.release(connection)

        return loop

    try:
        return await _paired(loop_of(bare_pool), loop_of(watched_pool), rounds, cycles)
    finally:
        watch.close()
        await bare_pool.close()
        await watched_pool.close()


async def psycopg_async_cycle(url: str, rounds: int, cycles: int) -> tuple[float, float, float]:
    from psycopg_pool import AsyncConnectionPool

    bare_pool: AsyncConnectionPool[Any] = AsyncConnectionPool(url, min_size=1, max_size=1, open=False)
    watched_pool: AsyncConnectionPool[Any] = AsyncConnectionPool(url, min_size=1, max_size=1, open=False)
    await bare_pool.open(wait=True)
    await watched_pool.open(wait=True)
    watch = poolwatch.watch(watched_pool, registry=CollectorRegistry(), name="bench-psycopg")

    def loop_of(pool: Any) -> Callable[[int], Awaitable[None]]:
        async def loop(n: int) -> None:
            for _ in range(n):
                connection = await pool.getconn()
                await pool.putconn(connection)

        return loop

    try:
        return await _paired(loop_of(bare_pool), loop_of(watched_pool), rounds, cycles)
    finally:
        watch.close()
        await bare_pool.close()
        await watched_pool.close()


async def psycopg_sync_cycle(url: str, rounds: int, cycles: int) -> tuple[float, float, float]:
    from psycopg_pool import ConnectionPool

    bare_pool: ConnectionPool[Any] = ConnectionPool(url, min_size=1, max_size=1, open=True)
    watched_pool: ConnectionPool[Any] = ConnectionPool(url, min_size=1, max_size=1, open=True)
    bare_pool.wait()
    watched_pool.wait()
    watch = poolwatch.watch(watched_pool, registry=CollectorRegistry(), name="bench-psycopg-sync")

    def loop_of(pool: Any) -> Callable[[int], Awaitable[None]]:
        async def loop(n: int) -> None:
            for _ in range(n):
                pool.putconn(pool.getconn())

        return loop

    try:
        return await _paired(loop_of(bare_pool), loop_of(watched_pool), rounds, cycles)
    finally:
        watch.close()
        bare_pool.close()
        watched_pool.close()


async def main(url: str, rounds: int, cycles: int) -> list[tuple[str, float, float, float]]:
    rows = []
    for name, run in (
        ("asyncpg Pool acquire+release", asyncpg_cycle),
        ("psycopg_pool AsyncConnectionPool getconn+putconn", psycopg_async_cycle),
        ("psycopg_pool ConnectionPool getconn+putconn", psycopg_sync_cycle),
    ):
        bare, watched, ratio = await run(url, rounds, cycles)
        rows.append((name, bare, watched, ratio))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--cycles", type=int, default=2000)
    arguments = parser.parse_args()
    table = asyncio.run(main(arguments.url, arguments.rounds, arguments.cycles))
    print(f"{'cycle':<52} {'bare µs':>9} {'watched µs':>11} {'ratio':>7}")
    for name, bare, watched, ratio in table:
        print(f"{name:<52} {bare:>9.2f} {watched:>11.2f} {ratio:>6.2f}x")
