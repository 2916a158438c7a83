"""Multi-worker servers: real gunicorn and uvicorn with two workers; any scrape reports the service.

Each server runs in its own session on a loopback port, against a small Starlette app written to a
temporary directory, and is torn down (SIGTERM, then SIGKILL) whatever happens.
"""

from __future__ import annotations

import gc
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy.engine import make_url

import poolwatch
from poolwatch._record.server import role_tag
from poolwatch._serve.multiprocess import MultiProcessCollector, Publisher
from tests.metrics import parse_text
from tests.ports import free_port
from tests.test_server_limit import pg_client_limit

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = 1000
POOL_SIZE = 2
PUBLISH_INTERVAL = 0.2

APP = """
import os

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import poolwatch

engine = create_async_engine(os.environ["APP_DATABASE_URL"], pool_size=POOL_SIZE, max_overflow=0)
held = []


async def work(request):
    async with engine.connect() as connection:
        await connection.execute(sa.text("SELECT 1"))
    return JSONResponse({"pid": os.getpid()})


async def hold(request):
    held.append(await engine.connect())
    return JSONResponse({"pid": os.getpid()})


app = Starlette(routes=[Route("/work", work), Route("/hold", hold)])
poolwatch.instrument(app, engine, name="app")
""".replace("POOL_SIZE", str(POOL_SIZE))


class Server:
    def __init__(self, command: list[str], directory: Path, port: int, env: dict[str, str]) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.port = port
        self.directory = directory
        self.log = (directory / "server.log").open("wb")
        self.process = subprocess.Popen(
            command, cwd=directory, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, workers: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited:\n{self.output()}"
            try:
                published = len(list((self.directory / "mp").glob("poolwatch-default-*.json")))
                if self.get("/health/live")[0] == 200 and published >= workers:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready:\n{self.output()}")

    def get(self, path: str) -> tuple[int, str]:
        """One request on a new connection, so the kernel may hand it to either worker."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()

    def pid_of(self, path: str) -> int:
        status, body = self.get(path)
        assert status == 200, body
        return int(json.loads(body)["pid"])

    def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, body = self.get("/metrics")
        assert status == 200
        return parse_text(body)

    def output(self) -> str:
        self.log.flush()
        return (self.directory / "server.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self.log.close()


def _server(kind: str, tmp_path: Path, postgres_url: str) -> Iterator[Server]:
    (tmp_path / "app.py").write_text(APP)
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]),
        "APP_DATABASE_URL": postgres_url.replace("postgresql://", "postgresql+asyncpg://", 1),
        "POOLWATCH_MULTIPROC_DIR": str(tmp_path / "mp"),
        "POOLWATCH_MULTIPROC_INTERVAL_SECONDS": str(PUBLISH_INTERVAL),
        "POOLWATCH_LEAK_THRESHOLD_SECONDS": "0",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if kind == "gunicorn":
        command = [
            sys.executable, "-m", "gunicorn", "-w", "2", "-k", "uvicorn.workers.UvicornWorker",
            "-c", "python:poolwatch.gunicorn", "-b", f"127.0.0.1:{port}", "--graceful-timeout",
            "3", "app:app",
        ]  # fmt: skip
    else:
        command = [
            sys.executable, "-m", "uvicorn", "--workers", "2", "--host", "127.0.0.1",
            "--port", str(port), "--no-access-log", "--timeout-graceful-shutdown", "3", "app:app",
        ]  # fmt: skip
    server = Server(command, tmp_path, port, env)
    try:
        server.wait_ready(workers=2)
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["gunicorn", "uvicorn"])
def server(request: pytest.FixtureRequest, tmp_path: Path, postgres_url: str) -> Iterator[Server]:
    yield from _server(request.param, tmp_path, postgres_url)


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.value(name, **labels)  # type: ignore[attr-defined, no-any-return]


def _wait_for_scrape(server: Server, condition: Callable[[Any], bool], seconds: float = 30) -> Any:
    """The first scrape that meets ``condition``; workers publish on their own clock."""
    deadline = time.monotonic() + seconds
    while True:
        samples = server.scrape()
        if condition(samples):
            return samples
        assert time.monotonic() < deadline, (
            f"no scrape met the condition within {seconds} s:\n{server.output()}"
        )
        time.sleep(PUBLISH_INTERVAL / 2)


def test_one_scrape_reports_every_worker(server: Server, postgres_url: str) -> None:
    def one_request(_: int) -> int:
        return server.pid_of("/work")

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        served = Counter(pool.map(one_request, range(REQUESTS)))
    print(f"{REQUESTS} requests in {time.monotonic() - started:.1f}s: {served}")
    assert sum(served.values()) == REQUESTS
    assert len(served) == 2, f"requests were not spread over both workers: {served}"

    client_limit = pg_client_limit(postgres_url)
    database = make_url(postgres_url)
    server_label = f"{database.host}:{database.port or 5432}/{database.database}"

    # Every worker publishes its last counts within an interval or so; a slow machine takes longer.
    _wait_for_scrape(
        server, lambda samples: _value(samples, "poolwatch_checkouts_total", pool="app") == REQUESTS
    )
    for _ in range(6):  # whichever worker answers, the answer is the service's
        samples = server.scrape()
        assert _value(samples, "poolwatch_checkouts_total", pool="app") == REQUESTS
        assert _value(samples, "poolwatch_checkins_total", pool="app") == REQUESTS
        assert _value(samples, "poolwatch_request_queries_count", route="/work", method="GET") == REQUESTS
        # The driver's own set-up statements on each worker's first connection count too.
        assert _value(samples, "poolwatch_query_seconds_count", pool="app", operation="SELECT") >= REQUESTS
        assert _value(samples, "poolwatch_connections_max", pool="app") == 2 * POOL_SIZE
        assert _value(samples, "poolwatch_connections", pool="app", state="used") == 0
        assert _value(samples, "poolwatch_pool_info", pool="app", dialect="postgresql",
                      driver="asyncpg", pool_class="AsyncAdaptedQueuePool", server=server_label,
                      role=role_tag(database)) == 1  # fmt: skip

    # One worker holds a connection; then it is killed and replaced.
    holder = server.pid_of("/hold")
    samples = _wait_for_scrape(
        server, lambda samples: _value(samples, "poolwatch_connections", pool="app", state="used") == 1
    )
    assert _value(samples, "poolwatch_checkouts_total", pool="app") == REQUESTS + 1

    os.kill(holder, signal.SIGKILL)
    deadline = time.monotonic() + 30
    replaced = False
    while time.monotonic() < deadline:
        try:
            samples = server.scrape()
        except (OSError, AssertionError):
            time.sleep(0.1)
            continue
        # Two live workers' gauges again (the survivor and the replacement), none of the dead one's.
        used = _value(samples, "poolwatch_connections", pool="app", state="used")
        maximum = _value(samples, "poolwatch_connections_max", pool="app")
        if used == 0 and maximum == 2 * POOL_SIZE:
            replaced = True
            break
        time.sleep(0.1)
    assert replaced, f"the dead worker's gauges never went away:\n{server.output()}"
    # Its counters still count.
    for _ in range(4):
        samples = server.scrape()
        assert _value(samples, "poolwatch_checkouts_total", pool="app") == REQUESTS + 1
        assert _value(samples, "poolwatch_connections", pool="app", state="used") == 0
        assert _value(samples, "poolwatch_connections_max", pool="app") == 2 * POOL_SIZE

    # The server's limit is read by each worker's /health/db probe (its checkouts count too, so
    # last): both workers read the same server, and the service reports it once, not twice. A
    # worker reads it only when its pool holds two idle connections; calls one after another may
    # all reach the replacement worker, whose pool then only ever opens one: so they come 16 at
    # once, as the requests above did, until a scrape shows the limit.
    def health(_: int) -> int:
        return server.get("/health/db")[0]

    def limit_shown(samples: Any) -> bool:
        return bool(samples.find("poolwatch_server_connections_max", pool="app"))

    deadline = time.monotonic() + 30
    with ThreadPoolExecutor(max_workers=16) as pool:
        while True:
            assert set(pool.map(health, range(32))) == {200}
            samples = server.scrape()
            if limit_shown(samples):
                break
            assert time.monotonic() < deadline, f"no worker read the server's limit:\n{server.output()}"
            time.sleep(0.5)
    assert _value(samples, "poolwatch_server_connections_max", pool="app") == client_limit


# -- the publisher, in process ----------------------------------------------------------------------


def _published_value(path: Path, sample: str, pool: str) -> float | None:
    try:
        document = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    found = [
        float(value)
        for family in document["families"]
        for name, labels, value, _ in family["samples"]
        if name == sample and labels.get("pool") == pool
    ]
    # None too before the pool is in the file: the publisher may write its first (empty) document
    # before watch() has added the engine.
    return sum(found) if found else None


def _published_checkouts(path: Path, pool: str) -> float | None:
    return _published_value(path, "poolwatch_checkouts_total", pool)


def test_the_published_file_never_goes_backwards(
    sync_url: str, tmp_path: Path, registry: CollectorRegistry
) -> None:
    """The publisher thread and scrapes both publish; a collection taken before a scrape's must
    never be written over it (the file went back by up to an interval of checkouts)."""
    engine = sa.create_engine(sync_url, pool_size=2, max_overflow=0)
    watch = poolwatch.watch(
        engine, registry=registry, name="race", leak_threshold_seconds=0, multiproc_dir=tmp_path,
        multiproc_interval_seconds=0.01,
    )  # fmt: skip
    stop = threading.Event()
    done = Counter[str]()

    def check_out_and_in(slot: str) -> None:
        while not stop.is_set():
            engine.pool.connect().close()
            done[slot] += 1

    def scrape() -> None:
        while not stop.is_set():
            generate_latest(registry)

    threads = [threading.Thread(target=check_out_and_in, args=(str(n),)) for n in range(2)]
    threads += [threading.Thread(target=scrape) for _ in range(2)]
    for thread in threads:
        thread.start()
    changes, backwards, previous = 0, [], 0.0
    try:
        (path,) = watch_files(tmp_path)
        limit = time.monotonic() + 120  # a failsafe only; the loop ends on the count of changes
        while changes < 400 and time.monotonic() < limit:
            value = _published_checkouts(path, "race")
            if value is None or value == previous:
                continue
            changes += 1
            if value < previous:
                backwards.append((previous, value))
            previous = value
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    try:
        assert changes >= 400, f"only {changes} publications seen"
        assert backwards == [], f"{len(backwards)} of {changes} reads went back: {backwards[:10]}"
        generate_latest(registry)  # a last scrape publishes the final count
        assert _published_checkouts(path, "race") == sum(done.values())
    finally:
        watch.close()
        engine.dispose()


def watch_files(directory: Path) -> list[Path]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        files = list(directory.glob("poolwatch-*.json"))
        if files:
            return files
        time.sleep(0.01)
    raise AssertionError(f"nothing published in {directory}")


def test_a_connection_checked_in_by_the_garbage_collector_inside_a_publication_does_not_hang(
    sync_url: str, tmp_path: Path, registry: CollectorRegistry
) -> None:
    """The publisher holds its lock while it collects, and collecting allocates: a garbage
    collection there can check a leaked connection in on the same thread. Nothing on that path may
    wait for the publisher's lock."""
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0)
    watch = poolwatch.watch(engine, registry=registry, name="gc", leak_threshold_seconds=0)
    local = watch.direct_collector
    assert local is not None
    reentered = threading.Event()

    class LeakThenCollect(Collector):
        """Collects the real families after a leaked connection has been reclaimed, in here."""

        calls = 0

        def collect(self) -> Iterator[Metric]:
            LeakThenCollect.calls += 1
            leaked: list[Any] = [engine.connect()]
            leaked.append(leaked)  # only the garbage collector can free it
            del leaked
            assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
            gc.collect()
            if engine.pool.checkedout() == 0:  # type: ignore[attr-defined]
                reentered.set()
            yield from local.collect()

    publisher = Publisher(LeakThenCollect(), tmp_path, "gc", 3600)
    try:
        scraped: list[list[Metric]] = []
        scrape = threading.Thread(
            target=lambda: scraped.append(list(MultiProcessCollector(publisher).collect()))
        )
        scrape.start()
        scrape.join(30)  # a self-deadlock never ends; this takes milliseconds
        assert not scrape.is_alive(), "a scrape hung on the publisher's own lock"
        assert reentered.is_set(), "the leaked connection was not checked in inside the collection"
        assert scraped and any(family.name == "poolwatch_checkouts" for family in scraped[0])
        reclaimed = _published_value(publisher.path, "poolwatch_gc_reclaimed_total", "gc")
        # Each collection leaks one connection and reclaims it before it reads the counts; the
        # file holds one of those collections (the newest written), so between 1 and the number of
        # collections (one scrape may collect more than once: the count is the publisher's, not
        # this test's, to choose).
        assert reclaimed is not None and 1 <= reclaimed <= LeakThenCollect.calls, (
            reclaimed,
            LeakThenCollect.calls,
        )
    finally:
        publisher.close()
        watch.close()
        engine.dispose()
