"""The server-limit read's ways to end, on real PostgreSQL, beyond tests/test_server_limit.py:

- a query that fails leaves the connection clean and in the pool, on the asyncio path too;
- a query that leaves the connection unusable (it ends its own server process, so the rollback
  after it fails) throws that connection away and frees its slot, never leaves it checked out;
- a read that finds the idle connection gone (taken between the check and the read) learns
  nothing and counts no failure: no backoff for a busy pool;
- a read that cannot start its task counts a failure and clears ``running``, so it is retried.
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import create_async_engine

import poolwatch
from poolwatch._capture.capacity import ensure_read, limits, reader
from poolwatch._capture.capacity.reader import _Job, reader_state
from poolwatch._capture.pool_hooks import recorder_of
from poolwatch._log import internal_errors
from poolwatch._record.recorder import PoolRecorder

SUICIDE = "SELECT pg_terminate_backend(pg_backend_pid())"
REFUSED = "SELECT poolwatch_no_such_function()"


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


async def _await(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def _ended(recorder: PoolRecorder) -> Callable[[], bool]:
    state = reader_state(recorder)
    return lambda: not state.running and (recorder.server_limit_read_at is not None or state.failures > 0)


@pytest.fixture
def sync_pool(sync_url: str, registry: CollectorRegistry) -> Iterator[tuple[sa.Engine, PoolRecorder]]:
    engine = sa.create_engine(sync_url, pool_size=2, max_overflow=0)
    watch = poolwatch.watch(engine, registry=registry, name="reads")
    recorder = recorder_of(engine.pool)
    assert recorder is not None
    with engine.connect() as first, engine.connect() as second:  # two idle: one is spare
        first.execute(sa.text("SELECT 1"))
        second.execute(sa.text("SELECT 1"))
    yield engine, recorder
    watch.close()
    engine.dispose()


def test_a_query_that_kills_its_connection_throws_it_away_and_frees_the_slot(
    sync_pool: tuple[sa.Engine, PoolRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, recorder = sync_pool
    monkeypatch.setitem(limits.QUERIES, "postgresql", SUICIDE)
    errors, disconnects = internal_errors.count, recorder.disconnects
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ensure_read(recorder)
        _wait(_ended(recorder), "the read")
    assert [str(warning.message) for warning in caught] == []
    assert reader_state(recorder).failures == 1
    assert internal_errors.count == errors + 1
    assert recorder.disconnects == disconnects + 1  # invalidated, not handed back half-dead
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    with engine.connect() as connection:  # the pool serves on
        assert connection.execute(sa.text("SELECT 2")).scalar_one() == 2


async def test_an_async_query_that_fails_leaves_its_connection_clean_in_the_pool(
    async_url: str, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(limits.QUERIES, "postgresql", REFUSED)
    engine = create_async_engine(async_url, pool_size=2, max_overflow=0)
    watch = poolwatch.watch(engine, registry=registry, name="refused_async")
    recorder = recorder_of(engine.sync_engine.pool)
    assert recorder is not None
    try:
        async with engine.connect() as first, engine.connect() as second:
            await first.execute(sa.text("SELECT 1"))
            await second.execute(sa.text("SELECT 1"))
        errors, disconnects = internal_errors.count, recorder.disconnects
        ensure_read(recorder)
        await _await(_ended(recorder), "the read")
        assert reader_state(recorder).failures == 1
        assert recorder.server_limit_read_at is None
        assert internal_errors.count == errors + 1
        assert recorder.disconnects == disconnects  # not thrown away: the rollback worked
        assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        for _ in range(2):
            async with engine.connect() as connection:
                raw = await connection.get_raw_connection()
                assert raw.driver_connection is not None
                assert not raw.driver_connection.is_in_transaction()
        assert recorder.connects == 2
    finally:
        watch.close()
        await engine.dispose()


def _job(engine: sa.Engine, recorder: PoolRecorder) -> _Job:
    endpoint = limits.endpoint_of(engine.url)
    query = limits.query_for("postgresql")
    assert endpoint is not None and query is not None
    return _Job(engine, recorder, reader_state(recorder), "postgresql", query, endpoint)


def test_a_read_that_finds_no_spare_connection_counts_no_failure(
    sync_pool: tuple[sa.Engine, PoolRecorder],
) -> None:
    """The spare idle connection was taken between the check and the read: nothing learnt,
    nothing failed, so no backoff delays the next read."""
    engine, recorder = sync_pool
    state = reader_state(recorder)
    errors, checkouts = internal_errors.count, recorder.checkouts
    with engine.connect():  # one of two taken: the other is the last idle one, never read from
        state.running = True
        # On a thread of its own, as the reader runs it: it sets the request context of its thread.
        worker = threading.Thread(target=_job(engine, recorder).run_sync)
        worker.start()
        worker.join(20)
        assert recorder.checkouts == checkouts + 1  # only the application's
    assert (state.running, state.failures, state.next_at) == (False, 0, -1.0)
    assert recorder.server_limit_read_at is None
    assert internal_errors.count == errors


async def test_an_async_read_that_finds_no_spare_connection_counts_no_failure(
    async_url: str, registry: CollectorRegistry
) -> None:
    engine = create_async_engine(async_url, pool_size=2, max_overflow=0)
    watch = poolwatch.watch(engine, registry=registry, name="busy_async")
    recorder = recorder_of(engine.sync_engine.pool)
    assert recorder is not None
    state = reader_state(recorder)
    errors = internal_errors.count
    try:
        endpoint = limits.endpoint_of(engine.url)
        query = limits.query_for("postgresql")
        assert endpoint is not None and query is not None
        job = _Job(engine.sync_engine, recorder, state, "postgresql", query, endpoint)
        state.running = True
        await asyncio.create_task(job.run_async())  # nothing idle at all
        assert (state.running, state.failures, state.next_at) == (False, 0, -1.0)
        assert internal_errors.count == errors
        assert recorder.checkouts == 0
    finally:
        watch.close()
        await engine.dispose()


def test_a_read_whose_task_cannot_start_counts_a_failure_and_is_retried(
    sync_pool: tuple[sa.Engine, PoolRecorder],
) -> None:
    """No running loop to start the task on (it closed meanwhile): the failure is counted and
    ``running`` cleared, so a later call starts a read again after the backoff."""
    engine, recorder = sync_pool
    state = reader_state(recorder)
    errors = internal_errors.count
    state.running = True
    with pytest.raises(RuntimeError):
        _job(engine, recorder).start_task()  # no running event loop here
    assert (state.running, state.failures) == (False, 1)
    assert state.next_at > time.monotonic()
    assert internal_errors.count == errors + 1
    assert reader._tasks == set()
