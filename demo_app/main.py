"""The demo app. Serve it with:  python -m demo_app   (or: uvicorn demo_app.main:app)"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import async_sessionmaker

import poolwatch

from .api import router
from .db import make_engine
from .models import Base
from .settings import DemoSettings


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
        try:
            yield
        finally:
            await engine.dispose()
            pool_watch.remove(engine)

    app = FastAPI(title="poolwatch demo", lifespan=lifespan)
    app.include_router(router)
    if settings.misbehave:
        from .misbehave import router as misbehaving

        app.include_router(misbehaving, prefix="/misbehave")
    # The one line: metrics on /metrics, health on /health/*, every checkout attributed. The demo
    # also shows the live page (/poolwatch), which poolwatch leaves off unless asked; POOLWATCH_UI
    # in the environment (token, never) still decides, since a keyword would override it.
    if "POOLWATCH_UI" in os.environ:
        pool_watch = poolwatch.instrument(app, registry=registry)
    else:
        pool_watch = poolwatch.instrument(app, registry=registry, ui="always")
    return app


app = create_app()
