"""An acquire/release cycle on asyncpg's and psycopg_pool's own pools, watched against bare.

Paired, interleaved wall-clock rounds in one process: each round times the same loop of
acquire + release on a bare pool and on a pool poolwatch watches (alternating which goes first),
and the table shows the median of the per-round ratios. No statement runs: the cycle is the
pool's own work plus poolwatch's hooks, the worst case for the ratio. Target: <= 1.25x.

With ``--instructions``, the same cycles counted instead under ``valgrind --tool=callgrind`` (as
``instructions.py`` counts SQLAlchemy's): each (pool, bare or watched) runs in a process of its own
with N1 and then N2 cycles, instrumentation switched on around the loop alone, and its cost per
cycle is (I(N2) - I(N1)) / (N2 - N1), main thread only, PYTHONHASHSEED fixed. A count does not move
with the machine's load the way wall-clock does on a shared 2-core VM.

    .venv/bin/python benchmarks/pool_libraries.py [--url postgresql://...] [--rounds 15] [--cycles 2000]
    .venv/bin/python benchmarks/pool_libraries.py --instructions [--n1 500 --n2 2500] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

import poolwatch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from instructions import ClientRequests, read_total

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


# -- instruction counts: one process per (pool, bare or watched) and N ---------------------------

CYCLES = {
    "asyncpg": "asyncpg Pool acquire+release",
    "psycopg_async": "psycopg_pool AsyncConnectionPool getconn+putconn",
    "psycopg_sync": "psycopg_pool ConnectionPool getconn+putconn",
}
WARMUP = 300
SWITCH_INTERVAL = 30.0  # seconds: the pool's worker threads never take the GIL mid-loop (instructions.py)


def counted_child(kind: str, watched: bool, n: int, url: str) -> None:
    """Under callgrind: open one pool (watched or not), warm it, count ``n`` cycles, exit at once."""
    control = ClientRequests()
    if not control.running_on_valgrind():
        raise SystemExit("pool_libraries.py --child: not under valgrind")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    if kind == "asyncpg":
        import asyncpg

        pool: Any = loop.run_until_complete(asyncpg.create_pool(url, min_size=1, max_size=1))

        async def cycles(count: int) -> None:
            for _ in range(count):
                connection = await pool.acquire()
                await pool.release(connection)

        def run(count: int) -> None:
            loop.run_until_complete(cycles(count))

    elif kind == "psycopg_async":
        from psycopg_pool import AsyncConnectionPool

        pool = AsyncConnectionPool(url, min_size=1, max_size=1, open=False)
        loop.run_until_complete(pool.open(wait=True))

        async def async_cycles(count: int) -> None:
            for _ in range(count):
                connection = await pool.getconn()
                await pool.putconn(connection)

        def run(count: int) -> None:
            loop.run_until_complete(async_cycles(count))

    else:
        from psycopg_pool import ConnectionPool

        pool = ConnectionPool(url, min_size=1, max_size=1, open=True)
        pool.wait()

        def run(count: int) -> None:
            for _ in range(count):
                pool.putconn(pool.getconn())

    if watched:
        poolwatch.watch(pool, registry=CollectorRegistry(), name=f"bench-{kind}")
    run(WARMUP)
    gc.collect()
    sys.setswitchinterval(SWITCH_INTERVAL)
    control.start()
    run(n)
    control.stop()
    sys.stdout.flush()
    os._exit(0)  # no teardown: identical for both N, and slow under valgrind


def count_instructions(kind: str, watched: bool, n: int, url: str, seed: int, out_dir: str) -> int:
    out = os.path.join(out_dir, f"{kind}.{int(watched)}.{n}.out")
    command = [
        "valgrind", "--tool=callgrind", "--separate-threads=yes", "--instr-atstart=no",
        f"--callgrind-out-file={out}", sys.executable, os.path.abspath(__file__),
        "--child", kind, *(["--watched"] if watched else []), "--n1", str(n), "--url", url,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONHASHSEED=str(seed))
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(poolwatch.__file__))), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    main_thread = sorted(name for name in os.listdir(out_dir) if name.startswith(os.path.basename(out) + "-"))
    if result.returncode != 0 or not main_thread:
        raise RuntimeError(f"{kind} watched={watched} n={n} failed:\n{result.stderr[-3000:]}")
    return read_total(Path(out_dir) / main_thread[0])


def instructions_table(
    url: str, n1: int, n2: int, seed: int, kinds: list[str]
) -> list[tuple[str, float, float, float]]:
    """(cycle, bare instructions per cycle, watched, ratio) for each kind."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="poolwatch-pool-libraries-") as out_dir:
        for kind in kinds:
            per_cycle = []
            for watched in (False, True):
                low = count_instructions(kind, watched, n1, url, seed, out_dir)
                high = count_instructions(kind, watched, n2, url, seed, out_dir)
                per_cycle.append((high - low) / (n2 - n1))
            rows.append((CYCLES[kind], per_cycle[0], per_cycle[1], per_cycle[1] / per_cycle[0]))
    return rows


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
    parser.add_argument("--instructions", action="store_true", help="count instructions under callgrind")
    parser.add_argument("--n1", type=int, default=500)
    parser.add_argument("--n2", type=int, default=2500)
    parser.add_argument("--seed", type=int, default=0, help="PYTHONHASHSEED of the counted processes")
    parser.add_argument("--only", nargs="*", choices=sorted(CYCLES), default=sorted(CYCLES))
    parser.add_argument("--child", choices=sorted(CYCLES), help=argparse.SUPPRESS)
    parser.add_argument("--watched", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        counted_child(arguments.child, arguments.watched, arguments.n1, arguments.url)
    elif arguments.instructions:
        print(f"{'cycle':<52} {'bare instr':>11} {'watched instr':>14} {'ratio':>7}")
        for name, bare, watched, ratio in instructions_table(
            arguments.url, arguments.n1, arguments.n2, arguments.seed, arguments.only
        ):
            print(f"{name:<52} {bare:>11.0f} {watched:>14.0f} {ratio:>6.2f}x", flush=True)
    else:
        table = asyncio.run(main(arguments.url, arguments.rounds, arguments.cycles))
        print(f"{'cycle':<52} {'bare µs':>9} {'watched µs':>11} {'ratio':>7}")
        for name, bare, watched, ratio in table:
            print(f"{name:<52} {bare:>9.2f} {watched:>11.2f} {ratio:>6.2f}x")
