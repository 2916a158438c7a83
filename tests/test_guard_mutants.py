"""The test guard's edge cases that the mutation run (scripts/mutation.sh --only edge) found unchecked.

Each test states what a user of the guard relies on: the exact failure message, the exact count,
the exact site named. In process, so a mutated copy of ``poolwatch._guard`` is what they run.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import psycopg_pool
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine
from sqlalchemy.pool import SingletonThreadPool, StaticPool

import poolwatch
import poolwatch._capture.psycopg_pool as psycopg_hooks
import poolwatch._guard as guard_module
from poolwatch._guard import ConnectionLeaked, Leak, PoolGuard
from tests.test_guard_in_process import _line
from tests.test_guard_in_process import sites_relative_to_the_repository as sites_relative_to_the_repository

ROOT = Path(__file__).resolve().parent.parent
HERE = "tests/test_guard_mutants.py"


def static_engine(poolclass: type[Any] = StaticPool, **kwargs: Any) -> Engine:
    return sa.create_engine(
        "sqlite://", poolclass=poolclass, connect_args={"check_same_thread": False}, **kwargs
    )


def raised_message(guard: PoolGuard) -> str:
    with pytest.raises(ConnectionLeaked) as raised:
        guard.check()
    return str(raised.value)


# --- Shared-record pools: a checkout dropped unclosed, then the engine used again ---------------


@pytest.mark.parametrize("poolclass", [StaticPool, SingletonThreadPool])
def test_a_dropped_shared_record_checkout_stays_reported_as_the_engine_is_reused(
    poolclass: type[Any],
) -> None:
    """Shared-record checkouts are filed under their proxy's ``id()``; CPython gives the next
    proxy the dropped one's address at once (StaticPool) or within a few checkouts. The dropped
    one must be moved out of the way when it is collected, or the next checkout filed under the
    same id replaces it and its close erases the leak: a leaking test would pass."""
    engine = static_engine(poolclass, pool_logging_name="lite")
    guard = PoolGuard().start()
    try:
        engine.connect(); taken = _line()  # noqa: E702  # fmt: skip
        for _ in range(20):
            with engine.connect() as again:
                again.execute(sa.text("SELECT 1"))
        function = "test_a_dropped_shared_record_checkout_stays_reported_as_the_engine_is_reused"
        assert raised_message(guard).splitlines() == [
            "1 connection never returned, reclaimed by the garbage collector:",
            f"  - taken at {HERE}:{taken} in {function} (pool lite)",
        ]
    finally:
        guard.stop()
        engine.dispose()


# --- The Engine flag at a budget's end ----------------------------------------------------------


def test_a_class_listener_still_fires_after_a_budget_that_could_not_read_the_engine_listeners(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Should SQLAlchemy's class-level dispatch change shape, the budget's end cannot tell whether
    a listener of the application's is left on the Engine class: it leaves ``_has_events`` set
    (slower statements, never an event missed)."""
    seen: list[str] = []

    def listener(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    dispatch_class: Any = type(Engine.dispatch)
    engine = sa.create_engine("sqlite://")
    try:
        with poolwatch.assert_max_queries(0):
            sa.event.listen(Engine, "before_cursor_execute", listener)
            # A name the dispatch does not answer to: reading the listeners at the end fails.
            monkeypatch.setattr(dispatch_class, "_event_names", ["gone", *dispatch_class._event_names])
        monkeypatch.undo()
        assert Engine.__dict__["_has_events"] is True
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        assert seen == ["SELECT 1"]
    finally:
        monkeypatch.undo()
        sa.event.remove(Engine, "before_cursor_execute", listener)
        Engine._has_events = False
        engine.dispose()


# --- A connection detached from its pool --------------------------------------------------------


def test_a_connection_detached_from_its_pool_is_no_longer_the_pools_to_return(sync_url: str) -> None:
    """``detach()`` takes a connection out of its pool for good (the pool's slot is free again):
    held past the test it is the application's own connection, not a checkout left out."""
    engine = sa.create_engine(sync_url, pool_size=1, pool_logging_name="detaching")
    guard = PoolGuard().start()
    try:
        detached = engine.connect()
        detached.detach()
        assert guard.leaks() == []
        guard.check()
        held = engine.connect(); taken = _line()  # noqa: E702  # fmt: skip
        function = "test_a_connection_detached_from_its_pool_is_no_longer_the_pools_to_return"
        assert raised_message(guard).splitlines() == [
            "1 connection still checked out at the end of the test:",
            f"  - taken at {HERE}:{taken} in {function} (pool detaching)",
        ]
        held.close()
        detached.close()
        guard.check()
    finally:
        guard.stop()
        engine.dispose()


# --- What a guard reads once stopped, and what a task held -------------------------------------


class Cycle:
    """Holds a connection in a reference cycle: only the garbage collector frees it."""

    connection: object
    itself: object


def test_a_stopped_guard_reports_what_it_saw_and_reads_a_later_collection_as_reclaimed(
    sync_url: str,
) -> None:
    """Once stopped, its listeners are off: ``leaks()`` runs no collection (the collector's return
    could not be seen), so a connection in uncollected garbage is still out. Collected later, the
    connection's reference is dead: reclaimed, beside the one still held."""
    engine = sa.create_engine(sync_url, pool_size=2, pool_logging_name="stopped")
    enabled = gc.isenabled()
    gc.disable()  # the cycle is collected when the test says, not at some allocation
    guard = PoolGuard().start()
    try:
        held = engine.connect(); held_line = _line()  # noqa: E702  # fmt: skip
        cycle = Cycle()
        cycle.connection = engine.connect(); cycle_line = _line()  # noqa: E702  # fmt: skip
        cycle.itself = cycle
        del cycle
        guard.stop()
        function = "test_a_stopped_guard_reports_what_it_saw_and_reads_a_later_collection_as_reclaimed"
        assert raised_message(guard).splitlines() == [
            "2 connections still checked out at the end of the test:",
            f"  - taken at {HERE}:{held_line} in {function} (pool stopped)",
            f"  - taken at {HERE}:{cycle_line} in {function} (pool stopped)",
        ]
        gc.collect()
        assert raised_message(guard).splitlines() == [
            "1 connection still checked out at the end of the test:",
            f"  - taken at {HERE}:{held_line} in {function} (pool stopped)",
            "1 connection never returned, reclaimed by the garbage collector:",
            f"  - taken at {HERE}:{cycle_line} in {function} (pool stopped)",
        ]
        held.close()
    finally:
        guard.stop()
        if enabled:
            gc.enable()
        engine.dispose()


async def test_a_connection_a_task_held_past_the_test_is_a_leak_not_reclaimed(sync_url: str) -> None:
    engine = sa.create_engine(sync_url, pool_size=1, pool_logging_name="tasks")
    guard = PoolGuard().start()
    holding = asyncio.Event()
    lines: dict[str, int] = {}

    async def hold() -> None:
        with engine.connect():
            lines["hold"] = _line() - 1
            holding.set()
            await asyncio.sleep(60)

    try:
        task = asyncio.create_task(hold(), name="holder")
        await holding.wait()
        guard.test_returned()
        task.cancel()  # as the loop's shutdown does: the connection is returned
        await asyncio.gather(task, return_exceptions=True)
        function = "test_a_connection_a_task_held_past_the_test_is_a_leak_not_reclaimed.<locals>.hold"
        assert guard.leaks() == [
            Leak(
                reclaimed=False,
                site=f"{HERE}:{lines['hold']}",
                function=function,
                route=None,
                pool="tasks",
                task="holder",
                still_out=False,
            )
        ]
    finally:
        guard.stop()
        engine.dispose()


# --- Watched driver pools -----------------------------------------------------------------------


def test_a_guard_narrowed_to_one_watched_driver_pool_reports_that_pools_leak(postgres_url: str) -> None:
    """Whichever order the watched pools are kept in, ``only(pool)`` reports that pool's leak:
    the pools not given are passed over, not the end of the search."""
    pools = {
        name: psycopg_pool.ConnectionPool(postgres_url, min_size=1, max_size=1, open=True)
        for name in ("first", "second")
    }
    watches = [poolwatch.watch(pool, registry=CollectorRegistry(), name=name) for name, pool in pools.items()]
    guard = PoolGuard().start()
    kept: dict[str, Any] = {}
    lines: dict[str, int] = {}
    try:
        kept["first"] = pools["first"].getconn(); lines["first"] = _line()  # noqa: E702  # fmt: skip
        kept["second"] = pools["second"].getconn(); lines["second"] = _line()  # noqa: E702  # fmt: skip
        function = "test_a_guard_narrowed_to_one_watched_driver_pool_reports_that_pools_leak"
        for name, pool in pools.items():
            guard.only(pool)
            assert raised_message(guard).splitlines() == [
                "1 connection still checked out at the end of the test:",
                f"  - taken at {HERE}:{lines[name]} in {function} (pool {name})",
            ]
    finally:
        guard.stop()
        for name, pool in pools.items():
            if name in kept:
                pool.putconn(kept[name])
        for watch in watches:
            watch.close()
        for pool in pools.values():
            pool.close()


def test_a_driver_checkout_at_the_instant_the_guard_started_is_the_tests(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkouts taken before the guard started are a fixture's or another test's; one taken at
    its very start (the same clock reading) is the test's own."""
    pool = psycopg_pool.ConnectionPool(postgres_url, min_size=1, max_size=1, open=True)
    watch = poolwatch.watch(pool, registry=CollectorRegistry(), name="instant")
    for module in (psycopg_hooks, guard_module):
        monkeypatch.setattr(module, "perf_counter", lambda: 1000.0)
    guard = PoolGuard().start()
    kept = []
    try:
        kept.append(pool.getconn()); taken = _line()  # noqa: E702  # fmt: skip
        function = "test_a_driver_checkout_at_the_instant_the_guard_started_is_the_tests"
        assert raised_message(guard).splitlines() == [
            "1 connection still checked out at the end of the test:",
            f"  - taken at {HERE}:{taken} in {function} (pool instant)",
        ]
        assert guard.leaks() == [
            Leak(reclaimed=False, site=f"{HERE}:{taken}", function=function, route=None, pool="instant")
        ]
    finally:
        guard.stop()
        for connection in kept:
            pool.putconn(connection)
        monkeypatch.undo()
        watch.close()
        pool.close()


def test_a_guard_never_started_has_seen_no_driver_checkout(postgres_url: str) -> None:
    """A ``PoolGuard`` made and not started has no listener on any pool, so it saw no engine's
    checkout; it owns no driver pool's checkout either, until ``start()``."""
    pool = psycopg_pool.ConnectionPool(postgres_url, min_size=1, max_size=2, open=True)
    watch = poolwatch.watch(pool, registry=CollectorRegistry(), name="unstarted")
    guard = PoolGuard()
    kept = []
    try:
        kept.append(pool.getconn())
        assert guard.leaks() == []
        guard.start()
        kept.append(pool.getconn()); taken = _line()  # noqa: E702  # fmt: skip
        function = "test_a_guard_never_started_has_seen_no_driver_checkout"
        assert guard.leaks() == [
            Leak(reclaimed=False, site=f"{HERE}:{taken}", function=function, route=None, pool="unstarted")
        ]
    finally:
        guard.stop()
        for connection in kept:
            pool.putconn(connection)
        watch.close()
        pool.close()
