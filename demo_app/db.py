"""The engine and the per-request session, written the way a careful team writes them."""

from __future__ import annotations

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
    """Each new SQLite connection: enforce foreign keys (off by default in SQLite), and offer
    pg_sleep() so the slow-query endpoint works without PostgreSQL too."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
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


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request: committed on success, rolled back on error, always closed."""
    sessions: async_sessionmaker[AsyncSession] = request.app.state.sessions
    async with sessions() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise
