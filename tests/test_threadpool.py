"""Reading AnyIO's worker threads: on the loop and off it, never creating the limiter.

A FastAPI app on the test's own event loop (httpx's ASGI transport), a real engine on PostgreSQL,
and AnyIO's real default limiter. A sync endpoint blocks on an event so the test knows a worker
thread is busy while it reads.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import anyio.to_thread
import httpx
import sqlalchemy as sa
from fastapi import Depends, FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session

import poolwatch
from poolwatch._record import events
from poolwatch._record.events import ThreadpoolStarvation
from poolwatch._serve.starvation import StarvationCheck
from poolwatch._serve.starvation import watcher as starvation_watcher
from poolwatch._serve.threadpool import ThreadpoolState, default_limiter, read_threadpool
from tests.metrics import scrape


def threadpool_samples(registry: CollectorRegistry) -> dict[str, float]:
    samples = scrape(registry)
    found = {labels["state"]: value for labels, value in samples.find("poolwatch_threadpool_threads")}
    for _, value in samples.find("poolwatch_threadpool_capacity"):
        found["capacity"] = value
    return found


async def test_threads_read_on_and_off_the_loop_without_creating_the_limiter(
    sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0)
    app = FastAPI()
    entered = threading.Event()
    release = threading.Event()

    @app.get("/async")
    async def async_endpoint() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/sync")
    def sync_endpoint() -> dict[str, bool]:
        entered.set()
        release.wait(30)
        return {"ok": True}

    watch = poolwatch.instrument(app, engine, registry=registry, name="tp")
    loop = asyncio.get_running_loop()
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            # Before any request poolwatch knows no app loop: no threadpool series at all.
            assert threadpool_samples(registry) == {}
            assert (await client.get("/async")).status_code == 200
            # An app that never used a worker thread: nothing busy, no capacity, and poolwatch did
            # not make AnyIO create the limiter (which would change the app).
            assert watch.app_loop is loop
            assert threadpool_samples(registry) == {"busy": 0, "waiting": 0}
            assert default_limiter(loop) is None

            request = asyncio.ensure_future(client.get("/sync"))
            await asyncio.to_thread(entered.wait, 30)  # the executor's thread, not AnyIO's
            # On the loop (as /metrics through the middleware reads it) ...
            assert threadpool_samples(registry) == {"busy": 1, "waiting": 0, "capacity": 40}
            # ... and off it (as the sidecar and the multi-worker publisher read it).
            off_loop: list[ThreadpoolState | None] = []
            reader = threading.Thread(target=lambda: off_loop.append(read_threadpool(loop)))
            reader.start()
            reader.join(10)
            (state,) = off_loop
            assert state == read_threadpool(loop)
            assert state == ThreadpoolState(busy=1, waiting=0, capacity=40)
            release.set()
            assert (await request).status_code == 200
            assert threadpool_samples(registry) == {"busy": 0, "waiting": 0, "capacity": 40}
            # The limiter read is the one the app uses, so the app's own setting shows.
            anyio.to_thread.current_default_thread_limiter().total_tokens = 7
            assert threadpool_samples(registry)["capacity"] == 7
    finally:
        release.set()
        watch.close()
        engine.dispose()


def test_a_closed_loop_or_none_reads_as_nothing() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    assert read_threadpool(loop) is None
    assert read_threadpool(None) is None


async def test_starvation_is_logged_once_per_episode(sync_url: str, registry: CollectorRegistry) -> None:
    """Two hangs, checked by hand (the process-wide checker is taken off so only these checks
    run): one event for each, however often the check runs during it."""
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0, pool_timeout=60)
    app = FastAPI()

    def get_db() -> Iterator[Session]:
        with Session(engine) as session:
            yield session

    # Defaults, not Annotated: FastAPI cannot resolve a local function named in a string annotation.
    def current_user(db: Session = Depends(get_db)) -> int:  # noqa: B008
        user = int(db.execute(sa.text("SELECT 1")).scalar_one())
        time.sleep(0.3)  # the connection is held while the other requests pile up
        return user

    @app.get("/items")
    def items(user: int = Depends(current_user)) -> dict[str, int]:
        return {"user": user}

    watch = poolwatch.instrument(app, engine, registry=registry, name="starved")
    seen: list[events.Event] = []
    previous = events.set_sinks([seen.append])
    transport = httpx.ASGITransport(app=app)
    loop = asyncio.get_running_loop()
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=90) as client:
            assert (await client.get("/items")).status_code == 200  # notes the loop, makes the limiter
            assert watch._starvation is not None
            starvation_watcher.discard(watch._starvation)
            check = StarvationCheck(watch, after_seconds=0)
            (recorder,) = watch.recorders

            async def one_episode() -> None:
                anyio.to_thread.current_default_thread_limiter().total_tokens = 2
                requests = [asyncio.ensure_future(client.get("/items")) for _ in range(6)]

                def hung() -> bool:
                    state = read_threadpool(loop)
                    assert state is not None
                    return state.busy == 2 and state.waiting > 0 and recorder.pending > 0

                while not hung():
                    assert not all(r.done() for r in requests), "the requests never hung"
                    await asyncio.sleep(0.05)
                for _ in range(5):  # the check runs again and again during the episode
                    await asyncio.to_thread(check.check)
                anyio.to_thread.current_default_thread_limiter().total_tokens = 20
                assert [(await r).status_code for r in requests] == [200] * 6
                await asyncio.to_thread(check.check)  # sees the episode end

            await one_episode()
            assert [type(e) for e in seen] == [ThreadpoolStarvation]
            await one_episode()
            assert [type(e) for e in seen] == [ThreadpoolStarvation, ThreadpoolStarvation]
            event = seen[0]
            assert isinstance(event, ThreadpoolStarvation)
            assert event.pool == "starved" and event.threads_capacity == 2 and event.threads_busy == 2
            assert event.routes == {"/items": 1} and event.checked_out == 1
            assert event.callers_waiting > 0 and event.threads_waiting > 0
    finally:
        events.set_sinks(previous)
        watch.close()
        engine.dispose()
