"""/health/db's verdict, tested against the situations that would fool it.

- Several pools: the worst decides, whichever pool it is (each case in both orders), and the status
  code follows ``health_saturated_status``.
- A ``saturated`` answer (a probe that missed its deadline against a stalled server) is cached for
  its period and not past it: once the server answers again, the answer after one period is ``ok``.
- The deadline holds against a stalled server, within a stated margin (deadline + 1 s: a loaded
  2-core machine, never a sub-second bound), where a wrong answer waits a 30 s ``pool_timeout``.
- Details behind a bearer token: the near misses (a prefix, one byte wrong, one byte more, empty,
  whitespace, other schemes and forms) show nothing.

Real PostgreSQL through tests/proxy.py's FaultProxy, a real uvicorn (``served``).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette

import poolwatch
from tests.fault_fixtures import proxied, served
from tests.proxy import FaultProxy

DEADLINE = 0.5
# A right answer takes its 0.5 s deadline; a wrong one waits pool_timeout (30 s). The margin is
# for a loaded 2-core machine.
MARGIN = 1.0
TOKEN = "Zq7-health-token-41"


@pytest.fixture
def proxies(postgres_url: str) -> Iterator[tuple[FaultProxy, FaultProxy]]:
    upstream = make_url(postgres_url)
    first = FaultProxy(upstream.port or 5432, upstream.host or "127.0.0.1", lifetime=120).start()
    second = FaultProxy(upstream.port or 5432, upstream.host or "127.0.0.1", lifetime=120).start()
    try:
        yield first, second
    finally:
        first.stop()
        second.stop()


def two_pool_app(
    postgres_url: str, proxies: tuple[FaultProxy, FaultProxy], registry: CollectorRegistry, **settings: Any
) -> Starlette:
    """Pools "a" and "b", each through its own proxy; a connect that hangs gives up after 20 s."""
    engines = {
        name: create_async_engine(
            proxied(postgres_url, proxy, "asyncpg"),
            pool_size=2,
            max_overflow=0,
            pool_timeout=30,
            connect_args={"timeout": 20},
        )
        for name, proxy in zip("ab", proxies, strict=True)
    }

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            for engine in engines.values():
                await engine.dispose()

    app = Starlette(lifespan=lifespan)
    poolwatch.instrument(
        app, engines, registry=registry, health_deadline_seconds=DEADLINE, health_details="always", **settings
    )
    return app


def ask(client: httpx.Client) -> tuple[int, str, dict[str, str], float]:
    """(status code, status, each pool's status, seconds taken)."""
    started = time.monotonic()
    response = client.get("/health/db")
    took = time.monotonic() - started
    body = response.json()
    return response.status_code, body["status"], {n: p["status"] for n, p in body["pools"].items()}, took


# A pool made "saturated": its server stalls, so the probe misses its deadline (saturated, error
# "timeout", until the stall window of 10 s passes). Made "down": its server refuses connections.
FAULT = {"saturated": "stall", "down": "refuse"}


@pytest.mark.parametrize(
    ("statuses", "saturated_status", "expected"),
    [
        # ok + saturated: degraded (200) by default, 503 "saturated" when the operator asks.
        (("ok", "saturated"), 200, (200, "degraded")),
        (("saturated", "ok"), 200, (200, "degraded")),
        (("ok", "saturated"), 503, (503, "saturated")),
        (("saturated", "ok"), 503, (503, "saturated")),
        # saturated + down: down, whatever the setting.
        (("saturated", "down"), 200, (503, "down")),
        (("down", "saturated"), 200, (503, "down")),
        (("down", "saturated"), 503, (503, "down")),
        # ok + down: down.
        (("ok", "down"), 200, (503, "down")),
        (("down", "ok"), 503, (503, "down")),
        # Both fine: ok.
        (("ok", "ok"), 503, (200, "ok")),
    ],
)
def test_the_worst_pool_decides(
    postgres_url: str,
    proxies: tuple[FaultProxy, FaultProxy],
    registry: CollectorRegistry,
    statuses: tuple[str, str],
    saturated_status: int,
    expected: tuple[int, str],
) -> None:
    app = two_pool_app(postgres_url, proxies, registry, health_saturated_status=saturated_status)
    for proxy, status in zip(proxies, statuses, strict=True):
        if status != "ok":
            proxy.set_mode(FAULT[status])  # type: ignore[arg-type]
    with served(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        code, shown, pools, took = ask(client)
    assert (code, shown) == expected
    assert pools == dict(zip("ab", statuses, strict=True))
    assert took < DEADLINE + MARGIN, took


def test_a_saturated_answer_is_cached_for_its_period_and_not_past_it(
    postgres_url: str, proxies: tuple[FaultProxy, FaultProxy], registry: CollectorRegistry
) -> None:
    cache = 2.0
    app = two_pool_app(postgres_url, proxies, registry, health_cache_seconds=cache)
    stalled = proxies[1]
    with served(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert ask(client)[:3] == (200, "ok", {"a": "ok", "b": "ok"})
        # Let the ok answer's period run out, then stall b's server: the next probe misses its
        # deadline.
        time.sleep(cache + 0.2)
        stalled.set_mode("stall")
        code, shown, pools, took = ask(client)
        answered_at = time.monotonic()
        assert (code, shown, pools) == (200, "degraded", {"a": "ok", "b": "saturated"})
        assert took < DEADLINE + MARGIN, took
        # The server answers again. Within the period the cached verdict stands (no new probe
        # yet: the proxy accepted no connection since)...
        stalled.set_mode("pass")
        accepted = stalled.accepted
        quick = ask(client)
        if time.monotonic() - answered_at < cache:
            assert quick[:3] == (200, "degraded", {"a": "ok", "b": "saturated"})
            assert stalled.accepted == accepted
        # ...and once the period has passed (measured from after the answer: load only adds to
        # it), a fresh probe answers: ok. A saturated answer kept past its period stays degraded.
        time.sleep(max(0.0, answered_at + cache + 0.2 - time.monotonic()))
        assert ask(client)[:3] == (200, "ok", {"a": "ok", "b": "ok"})


def test_the_deadline_holds_against_a_stalled_server_with_a_connection_in_the_pool(
    postgres_url: str, proxies: tuple[FaultProxy, FaultProxy], registry: CollectorRegistry
) -> None:
    """The pool's idle connection is black-holed too: the ping on it never returns."""
    app = two_pool_app(postgres_url, proxies, registry, health_cache_seconds=0)
    with served(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert ask(client)[:3] == (200, "ok", {"a": "ok", "b": "ok"})
        proxies[0].set_mode("stall")
        times = []
        for _ in range(3):
            code, shown, pools, took = ask(client)
            assert (code, shown, pools["b"]) == (200, "degraded", "ok")
            assert pools["a"] == "saturated"
            times.append(took)
    # Measured: each answer within deadline + 1 s (the wrong answer waits pool_timeout, 30 s).
    assert max(times) < DEADLINE + MARGIN, times


# -- the bearer token of /health/db's details ----------------------------------------------------


@pytest.fixture
def token_client(postgres_url: str, registry: CollectorRegistry) -> Iterator[httpx.Client]:
    engine = sa.create_engine(make_url(postgres_url).set(drivername="postgresql+psycopg"), pool_size=1)
    app = Starlette()
    poolwatch.instrument(
        app, engine, registry=registry, name="primary", health_details="token", health_token=TOKEN,
        health_cache_seconds=30,
    )  # fmt: skip
    try:
        with served(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            yield client
    finally:
        engine.dispose()


def _one_byte_wrong(token: str) -> str:
    middle = len(token) // 2
    return token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]


NEAR_MISSES = [
    pytest.param(f"Bearer {TOKEN[:-1]}", id="prefix-all-but-one"),
    pytest.param(f"Bearer {TOKEN[: len(TOKEN) // 2]}", id="prefix-half"),
    pytest.param(f"Bearer {TOKEN[0]}", id="prefix-one-char"),
    pytest.param(f"Bearer {TOKEN[1:]}", id="suffix"),
    pytest.param(f"Bearer {_one_byte_wrong(TOKEN)}", id="same-length-one-byte-wrong"),
    pytest.param(f"Bearer {TOKEN[:-1]}{chr(ord(TOKEN[-1]) + 1)}", id="same-length-last-byte-wrong"),
    pytest.param(f"Bearer {TOKEN}x", id="one-byte-more"),
    pytest.param(f"Bearer {TOKEN.upper()}", id="other-case"),
    pytest.param("Bearer\t" + TOKEN, id="tab-not-space"),
    pytest.param(f"Bearer:{TOKEN}", id="colon-form"),
    pytest.param(f'Bearer "{TOKEN}"', id="quoted"),
    pytest.param(f"Basic {TOKEN}", id="basic-scheme"),
    pytest.param(f"Token {TOKEN}", id="token-scheme"),
    pytest.param(TOKEN, id="no-scheme"),
    pytest.param(f"Bearer {TOKEN} {TOKEN}", id="twice"),
    pytest.param(f"Bearer token={TOKEN}", id="key-value"),
]


@pytest.mark.parametrize("authorization", NEAR_MISSES)
def test_a_near_miss_token_shows_no_details(token_client: httpx.Client, authorization: str) -> None:
    response = token_client.get("/health/db", headers={"authorization": authorization})
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    # The exact token, asked right after, does show them: the refusal above was the token's.
    shown = token_client.get("/health/db", headers={"authorization": f"Bearer {TOKEN}"})
    assert shown.status_code == 200 and set(shown.json()) == {"status", "pools"}


def raw_get(client: httpx.Client, path: str, authorization: bytes) -> tuple[int, dict[str, Any]]:
    """A GET with the Authorization header exactly as given (httpx refuses trailing spaces)."""
    url = client.base_url
    with socket.create_connection((url.host, url.port or 80), timeout=30) as sock:
        request = b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        sock.sendall(request + b"Authorization: " + authorization + b"\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize(
    "authorization", [b"Bearer", b"Bearer ", b"Bearer      ", b"Bearer \t ", b"   ", b""]
)
def test_an_empty_or_blank_token_shows_no_details(token_client: httpx.Client, authorization: bytes) -> None:
    assert raw_get(token_client, "/health/db", authorization) == (200, {"status": "ok"})
    # The same request with the token is answered with details: the raw request is well formed.
    status, body = raw_get(token_client, "/health/db", b"Bearer " + TOKEN.encode())
    assert status == 200 and set(body) == {"status", "pools"}


def test_the_token_in_the_query_string_or_a_cookie_shows_no_details(token_client: httpx.Client) -> None:
    for response in (
        token_client.get("/health/db", params={"token": TOKEN}),
        token_client.get("/health/db", params={"access_token": TOKEN}),
        token_client.get("/health/db", headers={"cookie": f"poolwatch_token={TOKEN}"}),
    ):
        assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_the_exact_token_shows_exact_details(token_client: httpx.Client) -> None:
    for authorization in (f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN}"):
        status, body = raw_get(token_client, "/health/db", authorization.encode())
        assert (status, body["status"]) == (200, "ok")
        pool = body["pools"]["primary"]
        assert (pool["status"], pool["used"], pool["max"], pool["pending"]) == ("ok", 0, 11, 0)
        assert set(pool) == {"status", "latency_seconds", "used", "idle", "max", "pending"}


@pytest.mark.parametrize("details", ["never", "always"])
def test_the_token_changes_nothing_unless_details_are_token(
    postgres_url: str, registry: CollectorRegistry, details: str
) -> None:
    """A token configured (the live page may use it) with details "never": even the exact token
    shows nothing; with "always", every caller sees them, token or not."""
    engine = sa.create_engine(make_url(postgres_url).set(drivername="postgresql+psycopg"), pool_size=1)
    app = Starlette()
    poolwatch.instrument(
        app, engine, registry=registry, name="primary", health_token=TOKEN, health_cache_seconds=30,
        health_details="never" if details == "never" else "always",
    )  # fmt: skip
    try:
        with served(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            answers = [
                client.get("/health/db", headers=headers).json()
                for headers in ({}, {"authorization": f"Bearer {TOKEN}"}, {"authorization": "Bearer wrong"})
            ]
    finally:
        engine.dispose()
    if details == "never":
        assert answers == [{"status": "ok"}] * 3
    else:
        assert all(set(answer) == {"status", "pools"} for answer in answers), answers
