"""The sync-endpoint deadlock, as FastAPI users meet it, for tests/test_threadpool_starvation.py.

A sync ``yield`` session dependency, a sync sub-dependency that loads "the current user" (so the
session holds its connection from then on) and a sync endpoint. Each step runs in an AnyIO worker
thread. With more concurrent requests than thread tokens and fewer connections than requests, the
requests that hold every token wait in ``Pool.connect()`` for the connection that a request waiting
for a token (to run its endpoint) holds: the service hangs while the database is idle.

Run with uvicorn; ``DATABASE_URL`` (postgresql+psycopg://...), ``THREAD_TOKENS`` (small, so the hang
needs few requests) and ``POOL_TIMEOUT`` come from the environment. ``/release`` is async, so it
runs on the loop without a token, and raises the limiter's tokens: the way out of the hang.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated

import anyio.to_thread
import sqlalchemy as sa
from fastapi import Depends, FastAPI
from sqlalchemy.orm import Session

import poolwatch

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")

TOKENS = int(os.environ.get("THREAD_TOKENS", "4"))
AUTH_SECONDS = float(os.environ.get("AUTH_SECONDS", "0.3"))
engine = sa.create_engine(
    os.environ["DATABASE_URL"],
    pool_size=1,
    max_overflow=0,
    pool_timeout=float(os.environ.get("POOL_TIMEOUT", "120")),
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The application's own choice, made the usual way (AnyIO's documentation does the same).
    anyio.to_thread.current_default_thread_limiter().total_tokens = TOKENS
    yield
    engine.dispose()


app = FastAPI(lifespan=lifespan)
poolwatch.instrument(app, engine, name="primary")


def get_db() -> Iterator[Session]:
    with Session(engine) as session:
        yield session


DB = Annotated[Session, Depends(get_db)]


def current_user(db: DB) -> int:
    user = int(db.execute(sa.text("SELECT 1")).scalar_one())
    # A slow check after the query (a password hash, a call to an identity provider): the session
    # holds its connection meanwhile, so concurrent requests pile up behind it, as under load.
    time.sleep(AUTH_SECONDS)
    return user


@app.get("/items")
def items(db: DB, user: Annotated[int, Depends(current_user)]) -> dict[str, int]:
    return {"user": user, "items": int(db.execute(sa.text("SELECT 2")).scalar_one())}


@app.post("/release")
async def release() -> dict[str, float]:
    limiter = anyio.to_thread.current_default_thread_limiter()
    limiter.total_tokens = TOKENS * 10
    return {"total_tokens": float(limiter.total_tokens)}
