"""The demo app, plus one route whose template is markup, for tests/test_live_page.py.

Served by uvicorn as ``tests.live_page_app:app``. The extra route takes a connection and holds it
for a while, so its template shows up in the live page's table of connections and in its route
rankings, where it must read as text and never run.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from demo_app.main import create_app

SCRIPT_ROUTE = "/odd/<script>window.__poolwatch_xss=1</script>/{item}"

app = create_app()


@app.get(SCRIPT_ROUTE)
async def markup_route(request: Request, item: int, seconds: float = 6.0) -> dict[str, int]:
    engine: AsyncEngine = request.app.state.engine
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
        await asyncio.sleep(min(seconds, 30.0))
    return {"item": item}
