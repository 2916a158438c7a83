"""A FastAPI app with every shape of endpoint a checkout can come from, for the attribution tests."""

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI
from fastapi.responses import StreamingResponse
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

import poolwatch

# Kept alive by the test that asks for a dropped session, then released to the GC on purpose.
DROPPED: list[Any] = []


def build_app(
    async_engine: AsyncEngine, sync_engine: sa.Engine, registry: Any, **settings: Any
) -> tuple[FastAPI, poolwatch.PoolWatch]:
    async_sessions = async_sessionmaker(async_engine, expire_on_commit=False)
    sync_sessions = sessionmaker(sync_engine)

    async def async_session() -> AsyncIterator[AsyncSession]:
        async with async_sessions() as session:
            yield session

    def sync_session() -> Iterator[Session]:
        with sync_sessions() as session:
            yield session

    async def broken_session() -> AsyncIterator[AsyncSession]:
        async with async_sessions() as session:
            await session.execute(sa.text("SELECT 1"))
            raise RuntimeError("the dependency failed after opening its session")
            yield session  # pragma: no cover - never reached

    AsyncDB = Annotated[AsyncSession, Depends(async_session)]
    SyncDB = Annotated[Session, Depends(sync_session)]

    app = FastAPI()

    @app.get("/users/{user_id}")
    async def read_user(user_id: int, db: AsyncDB) -> dict[str, int]:
        value = await db.scalar(sa.text("SELECT CAST(:id AS INTEGER)"), {"id": user_id})
        return {"id": int(value)}

    @app.get("/sync/items/{item_id}")
    def read_item(item_id: int, db: SyncDB) -> dict[str, int]:
        value = db.scalar(sa.text("SELECT CAST(:id AS INTEGER)"), {"id": item_id})
        return {"id": int(value)}

    @app.get("/nplus1/{count}")
    async def n_plus_one(count: int, db: AsyncDB) -> dict[str, int]:
        rows = (await db.execute(sa.text("SELECT generate_series(1, :n)"), {"n": count})).all()
        total = 0
        for (row,) in rows:  # one more query per row: the pattern request_queries exposes
            total += int(await db.scalar(sa.text("SELECT CAST(:v AS INTEGER)"), {"v": row}))
        return {"total": total}

    @app.get("/hold/{seconds}")
    async def hold(seconds: float, db: AsyncDB) -> dict[str, str]:
        await db.execute(sa.text("SELECT 1"))
        await asyncio.sleep(seconds)
        return {"held": str(seconds)}

    @app.get("/drop/async")
    async def drop_async() -> dict[str, str]:
        session = async_sessions()
        await session.execute(sa.text("SELECT 1"))
        DROPPED.append(session)  # never closed: the test lets it go and runs the GC
        return {"dropped": "async"}

    @app.get("/drop/sync")
    def drop_sync() -> dict[str, str]:
        session = sync_sessions()
        session.execute(sa.text("SELECT 1"))
        DROPPED.append(session)
        return {"dropped": "sync"}

    @app.get("/fail")
    async def fail(db: AsyncDB) -> dict[str, str]:
        await db.execute(sa.text("SELECT 1"))
        await db.execute(sa.text("SELECT * FROM no_such_table_poolwatch"))
        return {"never": "reached"}

    @app.get("/broken")
    async def broken(db: Annotated[AsyncSession, Depends(broken_session)]) -> dict[str, str]:
        return {"never": "reached"}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def rows() -> AsyncIterator[bytes]:
            async with async_sessions() as session:
                for i in range(3):
                    value = await session.scalar(sa.text("SELECT CAST(:v AS INTEGER)"), {"v": i})
                    yield f"{value}\n".encode()

        return StreamingResponse(rows(), media_type="text/plain")

    @app.get("/background")
    async def background(tasks: BackgroundTasks) -> dict[str, str]:
        async def after_response() -> None:
            async with async_sessions() as session:
                await session.execute(sa.text("SELECT 1"))

        tasks.add_task(after_response)
        return {"scheduled": "yes"}

    @app.get("/slow-query")
    async def slow_query(db: AsyncDB) -> dict[str, str]:
        await db.execute(
            sa.text("SELECT pg_sleep(0.05), email FROM (SELECT 'canary@example.com' AS email) s "
                    "WHERE email = 'canary@example.com'")
        )  # fmt: skip
        return {"slow": "yes"}

    router = APIRouter(prefix="/api/v1")

    @router.get("/orders/{order_id}")
    async def read_order(order_id: int, db: AsyncDB) -> dict[str, int]:
        return {"id": int(await db.scalar(sa.text("SELECT CAST(:id AS INTEGER)"), {"id": order_id}))}

    app.include_router(router)

    # The prefix given at include time, not on the router: FastAPI keeps that inclusion lazy.
    late = APIRouter()

    @late.get("/invoices/{invoice_id}")
    async def read_invoice(invoice_id: int, db: AsyncDB) -> dict[str, int]:
        return {"id": int(await db.scalar(sa.text("SELECT CAST(:id AS INTEGER)"), {"id": invoice_id}))}

    app.include_router(late, prefix="/billing")

    admin = FastAPI()
    admin_router = APIRouter()

    @admin_router.get("/audits/{audit_id}")
    async def read_audit(audit_id: int, db: AsyncDB) -> dict[str, int]:
        return {"id": int(await db.scalar(sa.text("SELECT CAST(:id AS INTEGER)"), {"id": audit_id}))}

    admin.include_router(admin_router, prefix="/v2")

    @admin.get("/reports/{report_id}")
    async def read_report(report_id: int, db: AsyncDB) -> dict[str, int]:
        return {"id": int(await db.scalar(sa.text("SELECT CAST(:id AS INTEGER)"), {"id": report_id}))}

    app.mount("/admin", admin)

    watch = poolwatch.instrument(
        app, {"async": async_engine, "sync": sync_engine}, registry=registry, **settings
    )
    return app, watch
