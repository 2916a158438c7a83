"""The sidecar's answers, word for word, over a real socket: what Prometheus and a readiness probe
get on ``metrics_port`` (tests/test_sidecar.py has the stories: which port serves what, which
loop runs health). Each answer is checked exactly: status line, content type, body; HEAD and
other methods; the health token and gzip through WSGI's own header names; the port and its
sharing between workers; an internal failure answered 500 and counted, never raised.
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import create_async_engine

import poolwatch
from poolwatch._log import internal_errors
from poolwatch._serve.sidecar import SidecarServer
from tests.ports import free_port

TOKEN = "s3cret-token"


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOLWATCH_METRICS_HOST", "127.0.0.1")


@pytest.fixture
def engine(sync_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0)
    yield engine
    engine.dispose()


@pytest.fixture
def served(engine: sa.Engine, registry: CollectorRegistry) -> Iterator[tuple[str, poolwatch.PoolWatch]]:
    """A watched engine whose sidecar serves health details to the token only."""
    port = free_port()
    watch = poolwatch.watch(
        engine,
        registry=registry,
        name="side",
        metrics_port=port,
        health_details="token",
        health_token=TOKEN,
        health_deadline_seconds=20,
    )
    try:
        yield f"http://127.0.0.1:{port}", watch
    finally:
        watch.close()


def test_an_unknown_path_is_a_plain_404(served: tuple[str, poolwatch.PoolWatch]) -> None:
    base, _ = served
    answer = httpx.get(f"{base}/elsewhere", timeout=5)
    assert (answer.status_code, answer.headers["content-type"], answer.content) == (
        404,
        "text/plain",
        b"Not Found\n",
    )


def test_head_gets_the_headers_without_a_body_and_post_is_refused(
    served: tuple[str, poolwatch.PoolWatch],
) -> None:
    base, _ = served
    for path in ("/metrics", "/health/live", "/health/db"):
        plain = {"Accept-Encoding": "identity"}
        get = httpx.get(f"{base}{path}", headers=plain, timeout=30)
        head = httpx.head(f"{base}{path}", headers=plain, timeout=30)
        assert (head.status_code, head.content) == (200, b""), path
        assert head.headers["content-type"] == get.headers["content-type"], path
        assert head.headers["content-length"] == str(len(get.content)), path
        post = httpx.post(f"{base}{path}", timeout=30)
        assert (post.status_code, post.headers["allow"], post.json()) == (
            405,
            "GET, HEAD",
            {"detail": "Method Not Allowed"},
        ), path


def test_health_details_only_to_the_bearer_of_the_token(served: tuple[str, poolwatch.PoolWatch]) -> None:
    """Read from WSGI's ``HTTP_AUTHORIZATION``: the token gives the pools' details; no token, or
    one byte off, gives the status alone."""
    base, _ = served
    with_token = httpx.get(f"{base}/health/db", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert with_token.status_code == 200
    assert with_token.json()["status"] == "ok"
    assert with_token.json()["pools"]["side"]["status"] == "ok"
    for headers in ({}, {"Authorization": f"Bearer {TOKEN[:-1]}x"}, {"Authorization": TOKEN}):
        bare = httpx.get(f"{base}/health/db", headers=headers, timeout=30)
        assert (bare.status_code, bare.json()) == (200, {"status": "ok"}), headers


def test_health_details_on_the_loop_of_an_app_also_need_the_token(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    """Watched from async code, health runs on that loop (``_run_on``): the token still decides."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    async def main() -> tuple[dict[str, Any], dict[str, Any], bool]:
        watch = poolwatch.watch(
            engine,
            registry=registry,
            name="looped",
            metrics_port=port,
            health_details="token",
            health_token=TOKEN,
            health_deadline_seconds=20,
        )
        try:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(timeout=30) as client:
                detailed = (await client.get(f"{base}/health/db", headers=headers)).json()
                bare = (await client.get(f"{base}/health/db")).json()
            return detailed, bare, watch._sidecar._owning_loop() is asyncio.get_running_loop()  # type: ignore[union-attr]
        finally:
            watch.close()

    detailed, bare, on_this_loop = asyncio.run(main())
    assert on_this_loop
    assert detailed["pools"]["looped"]["status"] == "ok"
    assert bare == {"status": "ok"}


def test_gzip_is_served_when_asked_through_accept_encoding(served: tuple[str, poolwatch.PoolWatch]) -> None:
    base, _ = served
    plain = httpx.get(f"{base}/metrics", headers={"Accept-Encoding": "identity"}, timeout=5)
    assert "content-encoding" not in plain.headers
    with httpx.stream("GET", f"{base}/metrics", headers={"Accept-Encoding": "gzip"}, timeout=5) as zipped:
        assert zipped.headers["content-encoding"] == "gzip"
        raw = b"".join(zipped.iter_raw())
    assert "poolwatch_checkouts_total" in gzip.decompress(raw).decode()


def test_an_async_engine_watched_from_async_code_is_probed_on_that_loop(
    async_url: str, registry: CollectorRegistry
) -> None:
    """The loop running where watch() was called owns the async pool's connections: the sidecar's
    health probes it there (a latency, no "skipped")."""
    engine = create_async_engine(async_url, pool_size=1, max_overflow=0)
    port = free_port()

    async def main() -> dict[str, Any]:
        watch = poolwatch.watch(
            engine, registry=registry, name="owned", metrics_port=port, health_details="always",
            health_deadline_seconds=20,
        )  # fmt: skip
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                answer = await client.get(f"http://127.0.0.1:{port}/health/db")
            payload: dict[str, Any] = answer.json()
            return payload
        finally:
            watch.close()
            await engine.dispose()

    payload = asyncio.run(main())
    pool = payload["pools"]["owned"]
    assert payload["status"] == "ok"
    assert "probe" not in pool and pool["latency_seconds"] is not None, pool


class _Broken(Collector):
    def collect(self) -> Iterator[Any]:
        raise RuntimeError("an application collector that fails")


def test_a_failure_while_answering_is_a_500_and_counted_never_raised(
    served: tuple[str, poolwatch.PoolWatch], registry: CollectorRegistry
) -> None:
    base, _ = served
    broken = _Broken()
    registry.register(broken)
    before = internal_errors.count
    try:
        answer = httpx.get(f"{base}/metrics", timeout=5)
    finally:
        registry.unregister(broken)
    assert (answer.status_code, answer.headers["content-type"], answer.content) == (
        500,
        "text/plain",
        b"poolwatch: internal error\n",
    )
    assert internal_errors.count == before + 1
    # Health still answers: only the failing answer is lost.
    assert httpx.get(f"{base}/health/live", timeout=5).status_code == 200


def test_the_server_reports_its_port_and_runs_on_a_named_daemon_thread(
    served: tuple[str, poolwatch.PoolWatch],
) -> None:
    base, watch = served
    sidecar = watch._sidecar
    assert isinstance(sidecar, SidecarServer)
    assert sidecar.port == int(base.rsplit(":", 1)[1])
    (thread,) = [t for t in threading.enumerate() if t.name == f"poolwatch-sidecar-{sidecar.port}"]
    assert thread.daemon is True


def test_a_port_is_shared_only_between_servers_that_all_ask_to_share_it(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    """Workers of one service share the port (SO_REUSEPORT, set when the multi-process directory
    is used); a single-process service never quietly shares one with another process's server."""
    watch = poolwatch.watch(engine, registry=registry, name="workers")
    first = SidecarServer(watch, 0, reuse_port=True)
    try:
        second = SidecarServer(watch, first.port, reuse_port=True)  # another worker: shares it
        second.close()
        with pytest.raises(OSError) as refused:
            SidecarServer(watch, first.port)
        assert refused.value.errno == errno.EADDRINUSE
        assert "setting metrics_port (POOLWATCH_METRICS_PORT)" in str(refused.value)
    finally:
        first.close()
        watch.close()
