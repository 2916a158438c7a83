"""Connections held across a response body (issue 27 §3), on real PostgreSQL under a real uvicorn,
with psycopg (sync) and asyncpg.

The pattern: a dependency with ``yield`` opens a session, the endpoint queries and returns a
StreamingResponse (or SSE), and the session, with its connection, lives until the stream ends.
What would fool it: a plain response through the same dependency (no event, whatever its timing),
and a checkout made inside the stream (after the response started: counted apart, never as held
after the response).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import poolwatch
from poolwatch._record import events
from poolwatch._record.events import HeldDuringResponse
from poolwatch._serve.state import CONNECTION_FIELDS, StateBuilder
from tests.fault_fixtures import served, served_here
from tests.metrics import scrape

PAUSE = 0.3
CHUNKS = 3


@pytest.fixture
def taken() -> Iterator[list[Any]]:
    found: list[Any] = []
    previous = events.set_sinks([found.append])
    yield found
    events.set_sinks(previous)


def _row_fields(watch: poolwatch.PoolWatch) -> list[dict[str, Any]]:
    [recorder] = watch.recorders
    state = json.loads(StateBuilder().build([(recorder.name, recorder)], None))
    return [dict(zip(CONNECTION_FIELDS, row, strict=True)) for row in state["pools"][0]["connections"]]


def _held_after(registry: CollectorRegistry, pool: str, route: str) -> tuple[float, float]:
    samples = scrape(registry)
    found = samples.find("poolwatch_held_after_response_seconds_count", pool=pool, route=route)
    if not found:
        return 0.0, 0.0
    total = samples.value("poolwatch_held_after_response_seconds_sum", pool=pool, route=route)
    return found[0][1], total


def _check(registry: CollectorRegistry, taken: list[Any], pool: str, seen: list[dict[str, Any]]) -> None:
    count, total = _held_after(registry, pool, "/stream")
    assert count == 1 and total >= CHUNKS * PAUSE
    count, total = _held_after(registry, pool, "/sse")
    assert count == 1 and total >= CHUNKS * PAUSE
    # Taken inside the stream: after the response started, so never "held after" it.
    assert _held_after(registry, pool, "/inside")[0] == 0
    samples = scrape(registry)
    assert samples.value("poolwatch_checkouts_after_response_total", pool=pool, route="/inside") == 1
    held = {event.route: event for event in taken if isinstance(event, HeldDuringResponse)}
    # The plain response went through the same dependency: no event, however long it took.
    assert set(held) == {"/stream", "/sse"}
    assert held["/stream"].response == "streaming" and held["/sse"].response == "sse"
    for event in held.values():
        assert event.pool == pool and event.method == "GET"
        assert event.seconds_after_response_started >= CHUNKS * PAUSE
        assert "yield" in event.likely_cause
        assert event.site.startswith("tests/test_response_holds.py:"), event.site
    # The live page, read from inside the stream: the checkout's time since the response started.
    [row] = [row for row in seen if row["route"] == "/stream"]
    assert row["after_response_ms"] >= PAUSE * 1000


def test_psycopg_session_of_a_yield_dependency_held_through_a_stream(
    sync_url: str, registry: CollectorRegistry, taken: list[Any]
) -> None:
    engine = sa.create_engine(sync_url, pool_size=2)
    app = FastAPI()
    watch = poolwatch.instrument(
        app, engine, registry=registry, name="sync", held_during_response_seconds=PAUSE / 2
    )
    seen: list[dict[str, Any]] = []

    def session() -> Iterator[Session]:
        with Session(engine) as db:
            yield db

    def chunks() -> Iterator[bytes]:
        for index in range(CHUNKS):
            time.sleep(PAUSE)
            if index == 1:
                seen.extend(_row_fields(watch))
            yield b"data: x\n\n"

    @app.get("/stream")
    def stream(db: Session = Depends(session)) -> StreamingResponse:  # noqa: B008
        db.execute(sa.text("SELECT 1"))
        return StreamingResponse(chunks())

    @app.get("/sse")
    def sse(db: Session = Depends(session)) -> StreamingResponse:  # noqa: B008
        db.execute(sa.text("SELECT 1"))
        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.get("/plain")
    def plain(db: Session = Depends(session)) -> dict[str, int]:  # noqa: B008
        return {"one": db.execute(sa.text("SELECT 1")).scalar_one()}

    @app.get("/inside")
    def inside() -> StreamingResponse:
        def body() -> Iterator[bytes]:
            with engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")
                time.sleep(PAUSE)
            yield b"x"

        return StreamingResponse(body())

    try:
        with served(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            for path in ("/stream", "/sse", "/plain", "/inside"):
                assert client.get(path).status_code == 200, path
        _check(registry, taken, "sync", seen)
    finally:
        watch.close()
        engine.dispose()


async def test_asyncpg_session_of_a_yield_dependency_held_through_a_stream(
    async_url: str, registry: CollectorRegistry, taken: list[Any]
) -> None:
    engine = create_async_engine(async_url, pool_size=2)
    app = FastAPI()
    watch = poolwatch.instrument(
        app, engine, registry=registry, name="async", held_during_response_seconds=PAUSE / 2
    )
    seen: list[dict[str, Any]] = []

    async def session() -> AsyncIterator[AsyncSession]:
        async with AsyncSession(engine) as db:
            yield db

    async def chunks() -> AsyncIterator[bytes]:
        for index in range(CHUNKS):
            await asyncio.sleep(PAUSE)
            if index == 1:
                seen.extend(_row_fields(watch))
            yield b"data: x\n\n"

    @app.get("/stream")
    async def stream(db: AsyncSession = Depends(session)) -> StreamingResponse:  # noqa: B008
        await db.execute(sa.text("SELECT 1"))
        return StreamingResponse(chunks())

    @app.get("/sse")
    async def sse(db: AsyncSession = Depends(session)) -> StreamingResponse:  # noqa: B008
        await db.execute(sa.text("SELECT 1"))
        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.get("/plain")
    async def plain(db: AsyncSession = Depends(session)) -> dict[str, int]:  # noqa: B008
        return {"one": (await db.execute(sa.text("SELECT 1"))).scalar_one()}

    @app.get("/inside")
    async def inside() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            async with engine.connect() as connection:
                await connection.exec_driver_sql("SELECT 1")
                await asyncio.sleep(PAUSE)
            yield b"x"

        return StreamingResponse(body())

    try:
        async with served_here(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            for path in ("/stream", "/sse", "/plain", "/inside"):
                assert (await client.get(path)).status_code == 200, path
        _check(registry, taken, "async", seen)
    finally:
        watch.close()
        await engine.dispose()
