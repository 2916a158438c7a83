"""The engine and the per-request session, written the way a careful team writes them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from .settings import DemoSettings

# The longest pg_sleep() the SQLite stand-in below will do: the slow-query endpoint's own cap.
SQLITE_SLEEP_CAP_SECONDS = 10.0


def _sqlite_sleep(seconds: Any) -> float:
    try:
        wanted = float(seconds)
    except (TypeError, ValueError):
        return 0.0
    slept = min(max(wanted, 0.0), SQLITE_SLEEP_CAP_SECONDS)
    time.sleep(slept)  # in the driver's thread, as a slow statement would be
    return slept


def _prepare_sqlite(dbapi_connection: Any, _record: Any) -> None:
    """Each new SQLite connection: enforce foreign keys (off by default in SQLite), write-ahead
    logging (readers never block the writer: a request holding a connection across a sleep cannot
    make a write fail with "database is locked"), and pg_sleep() so the slow-query endpoint works
    without PostgreSQL too."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()
    dbapi_connection.create_function("pg_sleep", 1, _sqlite_sleep)


def make_engine(settings: DemoSettings) -> AsyncEngine:
    url = settings.async_database_url
    if url.startswith("sqlite"):
        # SQLite has no server to pool against; SQLAlchemy picks the right pool for it.
        engine = create_async_engine(url)
        event.listen(engine.sync_engine.pool, "connect", _prepare_sqlite)
        return engine
    return create_async_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout,
        pool_recycle=settings.pool_recycle,
        pool_pre_ping=settings.pool_pre_ping,
    )


WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request: committed on success, rolled back on error, always closed.

    On SQLite, one writing request at a time (``app.state.write_lock``, made in the lifespan):
    SQLite has one writer, and two transactions that both read and then write fail one of them at
    once with "database is locked", whatever the busy timeout. PostgreSQL needs no such lock."""
    sessions: async_sessionmaker[AsyncSession] = request.app.state.sessions
    lock: asyncio.Lock | None = getattr(request.app.state, "write_lock", None)
    async with contextlib.AsyncExitStack() as stack:
        if lock is not None and request.method in WRITES:
            await stack.enter_async_context(lock)
        session = await stack.enter_async_context(sessions())
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise
