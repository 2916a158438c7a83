"""The demo app. Serve it with:  python -m demo_app   (or: uvicorn demo_app.main:app)"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import async_sessionmaker

import poolwatch

from .api import router
from .db import make_engine
from .errors import answer_client_errors_safely
from .models import Base
from .settings import DemoSettings

# The demo's own defaults for poolwatch, so a first look shows something within a minute: the live
# page on, and a leak threshold of 5 s instead of 30 (the misbehaving endpoints then show a leak
# a few seconds after they are called). A POOLWATCH_* variable in the environment still decides,
# since a keyword would override it.
DEMO_POOLWATCH_SETTINGS: dict[str, tuple[str, Any]] = {
    "ui": ("POOLWATCH_UI", "always"),
    "leak_threshold_seconds": ("POOLWATCH_LEAK_THRESHOLD_SECONDS", 5.0),
}


def demo_poolwatch_settings(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The demo's defaults that the environment does not set (pydantic-settings reads it anyway)."""
    present = {key.upper() for key in environ}
    defaults = DEMO_POOLWATCH_SETTINGS.items()
    return {name: value for name, (variable, value) in defaults if variable not in present}


def create_app(settings: DemoSettings | None = None, registry: CollectorRegistry | None = None) -> FastAPI:
    settings = settings or DemoSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings)
        pool_watch.add(engine, name="primary")
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        app.state.engine = engine
        app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
        app.state.write_lock = asyncio.Lock() if engine.dialect.name == "sqlite" else None
        try:
            yield
        finally:
            await engine.dispose()
            pool_watch.remove(engine)

    app = FastAPI(title="poolwatch demo", lifespan=lifespan)
    answer_client_errors_safely(app)
    app.include_router(router)
    if settings.misbehave:
        from .misbehave import postgresql_only
        from .misbehave import router as misbehaving

        app.include_router(misbehaving, prefix="/misbehave")
        if settings.async_database_url.startswith("postgresql"):
            app.include_router(postgresql_only, prefix="/misbehave")
    # The one line: metrics on /metrics, health on /health/*, every checkout attributed.
    pool_watch = poolwatch.instrument(app, registry=registry, **demo_poolwatch_settings())
    app.state.leak_threshold_seconds = pool_watch.settings.leak_threshold_seconds
    return app


app = create_app()
