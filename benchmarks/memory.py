"""Memory under load: 100,000 requests through the demo API with poolwatch, after a warm-up.

The app is ``benchmarks/e2e_app.py``'s ``poolwatch`` configuration (everything on), called
in-process as plain ASGI (no HTTP server, so nothing but the app and poolwatch allocates), with the
e2e benchmark's read-heavy mix plus 1% requests for unknown raw paths (``/nope/<n>``), which must
all land on the single ``<unmatched>`` route label. Reported after the warm-up:

- RSS growth of the process, sampled every 10% of the run;
- the sizes of poolwatch's per-pool tables, which must stay bounded;
- with ``--tracemalloc``: growth of live allocations made in ``poolwatch/`` (the recorder, its
  tables and histograms, the request contexts) and in the whole process. Tracing every allocation
  fragments the heap and inflates RSS by itself (measured: +18 MiB over 100,000 requests, against
  +3 MiB without it), so the RSS verdict comes from a run without it.

Target: RSS growth under 5 MB after warm-up.

    python benchmarks/memory.py                   # PostgreSQL at POOLWATCH_TEST_DATABASE_URL or 127.0.0.1
    python benchmarks/memory.py --config none     # the same without poolwatch, for comparison
    python benchmarks/memory.py --tracemalloc     # where poolwatch's live allocations are (slow)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import random
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import (
    database_url_from_env,
    print_header,
    rss_bytes,
    table,
    throwaway_database,
    with_driver,
)
from e2e_app import CONFIGS, POSTS_PER_USER, USERS, create_app, post_id
from fastapi import FastAPI
from starlette.types import Message

import poolwatch
import poolwatch._capture.sql
import poolwatch._record.context
from demo_app.settings import DemoSettings

TARGET_BYTES = 5 * 1024 * 1024
POOLWATCH_DIR = str(Path(poolwatch.__file__).resolve().parent)
MIB = 1024 * 1024


def requests(seed: int) -> Iterator[tuple[str, str, bytes]]:
    """An endless, reproducible stream of (method, path with query, body)."""
    chooser = random.Random(seed)
    for number in itertools.count():
        user = chooser.randint(1, USERS)
        post = post_id(user, chooser.randrange(POSTS_PER_USER))
        roll = chooser.randrange(100)
        if roll < 35:
            yield "GET", f"/users/{user}", b""
        elif roll < 55:
            yield "GET", f"/users/{user}/posts?limit=10", b""
        elif roll < 75:
            yield "GET", f"/users/{user}/posts/{post}", b""
        elif roll < 89:
            yield "GET", f"/users?limit=20&offset={chooser.randrange(USERS // 20) * 20}", b""
        elif roll < 99:
            body = json.dumps({"title": f"edited {number}"}).encode()
            yield "PATCH", f"/users/{user}/posts/{post}", body
        else:
            # Unknown raw paths, each one different: they must never become label values.
            yield "GET", f"/nope/{number}", b""


async def call(app: FastAPI, method: str, target: str, body: bytes) -> int:
    path, _, query = target.partition("?")
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    sent = False
    status = 0
    finished = asyncio.Event()

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        # As a server does: the client goes away only once the response is complete, so anything
        # still listening for a disconnect ends instead of lingering as a task.
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            finished.set()

    await app(scope, receive, send)
    return status


async def drive(app: FastAPI, stream: Iterator[tuple[str, str, bytes]], count: int, workers: int) -> None:
    """``count`` requests, ``workers`` at a time (a server's concurrent connections)."""
    remaining = iter(range(count))

    async def worker() -> None:
        for _ in remaining:
            method, target, body = next(stream)
            status = await call(app, method, target, body)
            expected = 404 if target.startswith("/nope/") else 200
            if status != expected:
                raise RuntimeError(f"{method} {target} answered {status}")

    await asyncio.gather(*(worker() for _ in range(workers)))


def table_sizes(app: FastAPI) -> dict[str, int]:
    """The sizes of everything poolwatch keeps per pool, route or statement."""
    watch: poolwatch.PoolWatch | None = None
    stack: Any = app.middleware_stack
    while stack is not None and watch is None:
        watch = getattr(stack, "watch", None)
        stack = getattr(stack, "app", None)
    if watch is None:
        return {}
    sizes: dict[str, int] = {}
    for recorder in watch.recorders:
        sizes["use_seconds routes"] = len(recorder.use)
        sizes["open checkouts"] = len(recorder.open_checkouts)
        sizes["leaked records"] = len(recorder.leaked_records)
        sizes["after-response routes"] = len(recorder.after_response)
        sizes["checkouts counted"] = recorder.checkouts
    sizes["request_queries routes"] = len(watch.requests.snapshot())
    sizes["statement operation cache"] = len(poolwatch._capture.sql.operation_cache)
    sizes["mount prefix cache"] = len(poolwatch._record.context._mount_prefixes)
    return sizes


def poolwatch_bytes(snapshot: tracemalloc.Snapshot) -> int:
    filtered = snapshot.filter_traces([tracemalloc.Filter(True, POOLWATCH_DIR + "/*")])
    return sum(stat.size for stat in filtered.statistics("filename"))


async def run(args: argparse.Namespace, url: str) -> None:
    settings = DemoSettings.model_validate(
        {"DATABASE_URL": with_driver(url, "asyncpg"), "POOL_SIZE": 10, "POOL_MAX_OVERFLOW": 10}
    )
    app = create_app(args.config, settings)
    stream = requests(seed=7)
    async with app.router.lifespan_context(app):
        started = time.perf_counter()
        await drive(app, stream, args.warmup, args.workers)
        warmup_seconds = time.perf_counter() - started
        gc.collect()
        if args.tracemalloc:
            tracemalloc.start()
        before = tracemalloc.take_snapshot() if args.tracemalloc else None
        rss_start = rss_bytes() - tracemalloc.get_tracemalloc_memory()
        checkpoints = []
        done = 0
        started = time.perf_counter()
        step = max(1, args.requests // 10)
        while done < args.requests:
            batch = min(step, args.requests - done)
            await drive(app, stream, batch, args.workers)
            done += batch
            gc.collect()
            rss = rss_bytes() - tracemalloc.get_tracemalloc_memory()
            checkpoints.append((done, rss, time.perf_counter() - started))
        after = tracemalloc.take_snapshot() if args.tracemalloc else None
        sizes = table_sizes(app)

    elapsed = checkpoints[-1][2]
    growth = checkpoints[-1][1] - rss_start
    print(
        f"\n- warm-up: {args.warmup} requests in {warmup_seconds:.0f} s; measured: "
        f"{args.requests} requests in {elapsed:.0f} s ({args.requests / elapsed:.0f} req/s, "
        f"{args.workers} concurrent{', tracemalloc on' if args.tracemalloc else ''})"
    )
    print(f"\n## RSS after warm-up, configuration `{args.config}`\n")
    rows = [["0", f"{rss_start / MIB:.1f}", "-"]] + [
        [f"{n:,}", f"{rss / MIB:.1f}", f"{(rss - rss_start) / MIB:+.2f}"] for n, rss, _ in checkpoints
    ]
    print(table(["requests", "RSS MiB", "growth MiB"], rows))
    verdict = "met" if growth < TARGET_BYTES else "MISSED"
    if args.tracemalloc:
        verdict = "n/a (tracemalloc on)"  # tracing itself fragments the heap: see the docstring
    lines = [["RSS growth (minus tracemalloc's own memory)", f"{growth / MIB:+.2f} MiB", verdict]]
    if before is not None and after is not None:
        mine = poolwatch_bytes(after) - poolwatch_bytes(before)
        total = sum(s.size for s in after.statistics("filename")) - sum(
            s.size for s in before.statistics("filename")
        )
        lines += [
            ["tracemalloc: live allocations made in poolwatch/", f"{mine / 1024:+.1f} KiB", ""],
            ["tracemalloc: live allocations, whole process", f"{total / 1024:+.1f} KiB", ""],
        ]
        top = after.filter_traces([tracemalloc.Filter(True, POOLWATCH_DIR + "/*")]).compare_to(
            before.filter_traces([tracemalloc.Filter(True, POOLWATCH_DIR + "/*")]), "lineno"
        )[:5]
        tracemalloc.stop()
    else:
        top = []
    print(f"\n## Growth over {args.requests:,} requests\n")
    print(table(["measure", "growth", f"< {TARGET_BYTES // MIB} MB"], lines))
    if top:
        print("\nLargest poolwatch allocation sites (net, live):\n")
        for stat in top:
            print(f"- `{stat.traceback[0]}`: {stat.size_diff / 1024:+.1f} KiB, "
                  f"{stat.count_diff:+d} blocks")  # fmt: skip
    if sizes:
        print("\n## poolwatch's tables after the run\n")
        print(table(["table", "entries"], [[k, f"{v:,}"] for k, v in sizes.items()]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=database_url_from_env(), help="PostgreSQL server to use")
    parser.add_argument("--config", choices=CONFIGS, default="poolwatch")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--warmup", type=int, default=5_000)
    parser.add_argument("--workers", type=int, default=16, help="concurrent requests")
    parser.add_argument("--tracemalloc", action="store_true", help="also trace allocations (3x slower)")
    args = parser.parse_args()
    print_header("poolwatch memory under load")
    with throwaway_database(args.url, "poolwatch_memory") as url:
        asyncio.run(run(args, url))


if __name__ == "__main__":
    main()
