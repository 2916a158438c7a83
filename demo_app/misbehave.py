"""Endpoints that misbehave on purpose, so poolwatch has something to catch.

Each one is a bug that real services ship: a slow statement, an N+1 loop, a background task that
keeps a connection past the leak threshold, a handler that sits on a connection, a broken query and
a connection that dies under the caller. Every one is bounded (capped durations, a cap on how many
run at once), so the demo can be hammered without hanging or draining its pool for good.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, HTTPException, Query, Request, status
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from .db import get_session
from .models import Post, User

router = APIRouter(tags=["misbehave"])
Session = Annotated[AsyncSession, Depends(get_session)]


def _cap(seconds: float) -> float:
    """A ceiling on a deliberate wait. DEMO_MAX_SLEEP_SECONDS lowers every ceiling at once: the API
    fuzzer (tests/test_demo_fuzz.py) runs the demo with it, so that trying each endpoint's largest
    value costs a fraction of a second instead of half a minute."""
    try:
        limit = float(os.environ.get("DEMO_MAX_SLEEP_SECONDS", "inf"))
    except ValueError:
        limit = float("inf")
    return min(seconds, limit) if limit > 0 else seconds


MAX_SLOW_QUERY_SECONDS = _cap(10.0)
MAX_HOLD_SECONDS = _cap(30.0)
MAX_LEAK_SECONDS = _cap(120.0)
MAX_N_PLUS_ONE = 50
# At most this many connections are held on purpose at once, so a load generator (or a curious
# human with a loop) cannot turn the demo into a permanent outage.
MAX_CONCURRENT_HOLDS = 2


def _holds(request: Request) -> asyncio.Semaphore:
    """One semaphore per app (and so per event loop), made on first use."""
    state = request.app.state
    holds: asyncio.Semaphore | None = getattr(state, "misbehave_holds", None)
    if holds is None:
        holds = state.misbehave_holds = asyncio.Semaphore(MAX_CONCURRENT_HOLDS)
    return holds


def _refuse_if_busy(holds: asyncio.Semaphore) -> None:
    if holds.locked():
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"at most {MAX_CONCURRENT_HOLDS} deliberate holds run at once",
        )


def _leak_threshold(request: Request) -> float:
    """poolwatch's leak threshold for this app (main.py notes it at start-up)."""
    threshold: float = getattr(request.app.state, "leak_threshold_seconds", 30.0)
    return threshold


def _default_leak_seconds(threshold: float) -> float:
    # Long enough to cross the threshold and be swept; leak detection off means any short hold.
    return min(MAX_LEAK_SECONDS, threshold + 1.5) if threshold > 0 else 5.0


def _engine(request: Request) -> AsyncEngine:
    engine: AsyncEngine = request.app.state.engine
    return engine


@asynccontextmanager
async def _hold_slot(request: Request) -> AsyncIterator[None]:
    """Take one of the few slots for holding a connection on purpose, or answer 429 at once."""
    holds = _holds(request)
    _refuse_if_busy(holds)
    async with holds:
        yield


async def _sleep_query(session_or_conn: Any, seconds: float) -> None:
    """A statement that takes `seconds` in the database: PostgreSQL's pg_sleep, or on SQLite the
    function of that name that db.py gives each connection (it sleeps in the driver's thread)."""
    await session_or_conn.execute(text("SELECT pg_sleep(:seconds)"), {"seconds": seconds})


@router.get("/slow-query")
async def slow_query(
    request: Request,
    session: Session,
    seconds: Annotated[float, Query(ge=0, le=MAX_SLOW_QUERY_SECONDS)] = min(1.5, MAX_SLOW_QUERY_SECONDS),
) -> dict[str, object]:
    """One statement slower than poolwatch's slow-query threshold (1 s by default)."""
    await _sleep_query(session, seconds)
    return {"slept_seconds": seconds}


@router.get("/n-plus-one")
async def n_plus_one(
    session: Session, users: Annotated[int, Query(ge=1, le=MAX_N_PLUS_ONE)] = 10
) -> dict[str, object]:
    """The classic: one query for the list, then one more per row (1 + N statements)."""
    rows = list(await session.scalars(select(User).order_by(User.id).limit(users)))
    counts: dict[int, int] = {}
    for user in rows:
        # The bug on purpose: this belongs in the first query as a GROUP BY or a join.
        counts[user.id] = (
            await session.scalar(select(func.count()).select_from(Post).where(Post.author_id == user.id)) or 0
        )
    return {"users": len(rows), "queries": 1 + len(rows), "posts_by_user": counts}


@router.get("/hold")
async def hold(
    request: Request, seconds: Annotated[float, Query(ge=0, le=MAX_HOLD_SECONDS)] = min(3.0, MAX_HOLD_SECONDS)
) -> dict[str, object]:
    """A handler that keeps its connection while it waits on something else (here: a sleep)."""
    async with _hold_slot(request), _engine(request).connect() as connection:
        await connection.execute(text("SELECT 1"))
        await asyncio.sleep(seconds)  # stands in for a slow HTTP call made inside a transaction
    return {"held_seconds": seconds}


async def _hold_in_background(engine: AsyncEngine, holds: asyncio.Semaphore, seconds: float) -> None:
    async with holds, engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
        await asyncio.sleep(seconds)


@router.post("/leak", status_code=status.HTTP_202_ACCEPTED)
async def leak(
    request: Request,
    background: BackgroundTasks,
    seconds: Annotated[float | None, Query(ge=0, le=MAX_LEAK_SECONDS)] = None,
) -> dict[str, object]:
    """Answers at once, then a background task holds a connection past the leak threshold.

    The connection is returned in the end (after `seconds`, by default the leak threshold plus a
    little), so poolwatch counts a leak (`poolwatch_leaks_total`) and the pool recovers.
    """
    holds = _holds(request)
    _refuse_if_busy(holds)
    threshold = _leak_threshold(request)
    hold_for = _default_leak_seconds(threshold) if seconds is None else seconds
    background.add_task(_hold_in_background, _engine(request), holds, hold_for)
    return {"holding_seconds": hold_for, "leak_threshold_seconds": threshold}


async def _expect_db_error(
    engine: AsyncEngine, work: Callable[[Any], Awaitable[object]]
) -> dict[str, object]:
    """Run work that must fail in the database, and report how. The failure is the point of the
    endpoint, so it answers 200 with what happened: poolwatch counted it, the client did nothing
    wrong and the demo did what it was asked."""
    async with engine.connect() as connection:
        try:
            await work(connection)
        except DBAPIError as error:
            return {
                "error": type(error.orig).__name__,
                "connection_invalidated": error.connection_invalidated,
            }
    raise RuntimeError("the statement that must fail succeeded")  # a bug of the demo: a 500


@router.get("/query-error")
async def query_error(request: Request) -> dict[str, object]:
    """A statement against a table that does not exist (poolwatch_query_errors_total)."""

    async def work(connection: Any) -> object:
        return await connection.execute(text("SELECT * FROM poolwatch_demo_no_such_table"))

    return await _expect_db_error(_engine(request), work)


async def dead_connection(request: Request) -> dict[str, object]:
    """The server ends our own backend mid-request: the pool invalidates that connection.
    PostgreSQL only (pg_terminate_backend): routed by ``postgresql_only`` below."""

    async def work(connection: Any) -> object:
        await connection.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        # Some drivers only notice on the next round trip.
        return await connection.execute(text("SELECT 1"))

    return await _expect_db_error(_engine(request), work)


# Endpoints that need a PostgreSQL server: main.py includes this router only on PostgreSQL, so
# on SQLite they are absent from the API (404), not a server error.
postgresql_only = APIRouter(tags=["misbehave"])
postgresql_only.add_api_route("/dead-connection", dead_connection, methods=["GET"])


MAX_SYNC_WORK_SECONDS = _cap(2.0)


@router.get("/sync-work")
def sync_work(
    seconds: Annotated[float, Query(ge=0, le=MAX_SYNC_WORK_SECONDS)] = min(0.2, MAX_SYNC_WORK_SECONDS),
) -> dict[str, object]:
    """A sync endpoint: FastAPI runs it in one of AnyIO's worker threads, which it holds while it
    blocks (here: a sleep standing in for a blocking client library). The threadpool panels
    (poolwatch_threadpool_threads) show the threads it keeps busy."""
    time.sleep(seconds)
    return {"slept_seconds": seconds}
