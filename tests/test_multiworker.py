"""Multi-worker servers: real gunicorn and uvicorn with two workers; any scrape reports the service.

Each server runs in its own session on a loopback port, against a small Starlette app written to a
temporary directory, and is torn down (SIGTERM, then SIGKILL) whatever happens.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.metrics import parse_text

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    port = _free_port()
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


def test_one_scrape_reports_every_worker(server: Server) -> None:
    def one_request(_: int) -> int:
        return server.pid_of("/work")

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        served = Counter(pool.map(one_request, range(REQUESTS)))
    print(f"{REQUESTS} requests in {time.monotonic() - started:.1f}s: {served}")
    assert sum(served.values()) == REQUESTS
    assert len(served) == 2, f"requests were not spread over both workers: {served}"

    time.sleep(PUBLISH_INTERVAL * 4)  # every idle worker has published its last counts
    for _ in range(6):  # whichever worker answers, the answer is the service's
        samples = server.scrape()
        assert _value(samples, "poolwatch_checkouts_total", pool="app") == REQUESTS
        assert _value(samples, "poolwatch_checkins_total", pool="app") == REQUESTS
        assert _value(samples, "poolwatch_request_queries_count", route="/work") == REQUESTS
        # The driver's own set-up statements on each worker's first connection count too.
        assert _value(samples, "poolwatch_query_seconds_count", pool="app", operation="SELECT") >= REQUESTS
        assert _value(samples, "poolwatch_connections_max", pool="app") == 2 * POOL_SIZE
        assert _value(samples, "poolwatch_connections", pool="app", state="used") == 0
        assert _value(samples, "poolwatch_pool_info", pool="app", dialect="postgresql",
                      driver="asyncpg", pool_class="AsyncAdaptedQueuePool") == 1  # fmt: skip

    # One worker holds a connection; then it is killed and replaced.
    holder = server.pid_of("/hold")
    time.sleep(PUBLISH_INTERVAL * 4)
    samples = server.scrape()
    assert _value(samples, "poolwatch_connections", pool="app", state="used") == 1
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
