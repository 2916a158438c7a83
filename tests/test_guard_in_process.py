"""The test guard's leak reports, in this process: what a user reads when a test leaks.

tests/test_guard_checkouts.py and tests/test_pytest_plugin.py run real pytest in subprocesses
(the plugin found as a user's suite finds it); these drive the same guard objects here, so every
word of a report is checked where a mutation test sees it: the count, the pool, the code site
(``file:line``), the route, the asyncio task that held a connection. Real PostgreSQL, and SQLite
with StaticPool and SingletonThreadPool (FastAPI's testing docs use StaticPool with SQLite).
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psycopg
import psycopg_pool
import pytest
import sqlalchemy as sa
from fastapi import FastAPI, WebSocket
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool, QueuePool, SingletonThreadPool, StaticPool

import poolwatch
from poolwatch._guard import (
    ConnectionLeaked,
    Leak,
    PoolGuard,
    QueryBudgetExceeded,
    active_listeners,
    leak_message,
)
from poolwatch._record import events

ROOT = Path(__file__).resolve().parent.parent
HERE = "tests/test_guard_in_process.py"
TASK_SECTION = (
    "held by an asyncio task still running when the test returned "
    "(cancelled since by the event loop's shutdown, which returned it):"
)


def _line() -> int:
    """The caller's line: the site a report must name for a checkout made on it."""
    return sys._getframe(1).f_lineno


@pytest.fixture(autouse=True)
def sites_relative_to_the_repository() -> Iterator[None]:
    """Sites read ``tests/test_guard_in_process.py:N``, whichever test set the root before."""
    before = events._application_root
    events.set_application_root(str(ROOT))
    yield
    events._application_root = before
    events.shown_path.cache_clear()
    assert active_listeners() == (0, 0)


@pytest.fixture
def engine(sync_url: str) -> Iterator[Engine]:
    engine = sa.create_engine(sync_url, pool_size=3, pool_logging_name="guarded")
    yield engine
    engine.dispose()


def static_engine(poolclass: type[Any] = StaticPool, **kwargs: Any) -> Engine:
    return sa.create_engine(
        "sqlite://", poolclass=poolclass, connect_args={"check_same_thread": False}, **kwargs
    )


def checkins_of(engine: Engine) -> list[object]:
    """The pool's ``checkin`` and ``reset`` events: a connection really given back to SQLAlchemy,
    reset as SQLAlchemy resets it (not rolled back twice when its transaction was already)."""
    seen: list[object] = []
    sa.event.listen(engine, "checkin", lambda *_: seen.append("checkin"))
    sa.event.listen(
        engine, "reset", lambda _c, _r, state: seen.append(("reset", state.transaction_was_reset))
    )
    return seen


def raised_message(guard: PoolGuard) -> str:
    with pytest.raises(ConnectionLeaked) as raised:
        guard.check()
    assert type(raised.value) is ConnectionLeaked and isinstance(raised.value, AssertionError)
    return str(raised.value)


# --- The message ------------------------------------------------------------------------------


def test_every_kind_of_leak_counted_in_its_own_section_in_order(engine: Engine) -> None:
    other = static_engine(pool_logging_name="lite")
    guard = PoolGuard().start()
    try:
        first = engine.connect(); first_line = _line()  # noqa: E702  # fmt: skip
        second = other.connect(); second_line = _line()  # noqa: E702  # fmt: skip
        holder: dict[str, object] = {"connection": engine.connect()}; cycle_line = _line()  # noqa: E702  # fmt: skip
        holder["self"] = holder
        del holder
        function = "test_every_kind_of_leak_counted_in_its_own_section_in_order"
        assert raised_message(guard).splitlines() == [
            "2 connections still checked out at the end of the test:",
            f"  - taken at {HERE}:{first_line} in {function} (pool guarded)",
            f"  - taken at {HERE}:{second_line} in {function} (pool lite)",
            "1 connection never returned, reclaimed by the garbage collector:",
            f"  - taken at {HERE}:{cycle_line} in {function} (pool guarded)",
        ]
        first.close()
        assert [(leak.reclaimed, leak.still_out, leak.pool) for leak in guard.leaks()] == [
            (False, True, "lite"),
            (True, False, "guarded"),
        ]
        second.close()
        # What the garbage collector returned stays a leak: it was never closed.
        assert raised_message(guard).splitlines()[0] == (
            "1 connection never returned, reclaimed by the garbage collector:"
        )
    finally:
        guard.stop()
        other.dispose()


def test_the_message_words_for_one_and_for_several() -> None:
    def leak(n: int, **kwargs: Any) -> Leak:
        fields: dict[str, Any] = {"reclaimed": False, "site": f"app.py:{n}", "function": "f", "route": None}
        return Leak(**(fields | {"pool": "p"} | kwargs))

    assert leak_message([]) == ""
    assert leak_message(
        [
            leak(1, reclaimed=True),
            leak(2, task="t1", still_out=False),
            leak(3, route="GET /a", task="t2", still_out=False),
            leak(4, route="/ws"),
            leak(5, reclaimed=True, route="POST /b"),
        ]
    ).splitlines() == [
        "1 connection still checked out at the end of the test:",
        "  - taken at app.py:4 in f, route /ws (pool p)",
        f"2 connections {TASK_SECTION}",
        "  - taken at app.py:2 in f, by task 't1' (pool p)",
        "  - taken at app.py:3 in f, route GET /a, by task 't2' (pool p)",
        "2 connections never returned, reclaimed by the garbage collector:",
        "  - taken at app.py:1 in f (pool p)",
        "  - taken at app.py:5 in f, route POST /b (pool p)",
    ]
    assert (
        leak_message([leak(6, task="t3", still_out=False)]).splitlines()[0] == f"1 connection {TASK_SECTION}"
    )
    assert leak_message([leak(7), leak(8)]).splitlines()[0] == (
        "2 connections still checked out at the end of the test:"
    )
    assert leak_message([leak(9, reclaimed=True)]) == (
        "1 connection never returned, reclaimed by the garbage collector:\n  - taken at app.py:9 in f (pool p)"
    )


def test_a_site_under_the_working_directory_is_shown_relative_to_it(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    events.set_application_root("")  # no application root: the file whole, then the cwd's part cut
    guard = PoolGuard().start()
    try:
        connection = engine.connect(); taken = _line()  # noqa: E702  # fmt: skip
        monkeypatch.chdir(ROOT)
        assert [leak.site for leak in guard.leaks()] == [f"{HERE}:{taken}"]
        monkeypatch.chdir(tmp_path)
        assert [leak.site for leak in guard.leaks()] == [f"{ROOT / HERE}:{taken}"]
        gone = tmp_path / "gone"
        gone.mkdir()
        monkeypatch.chdir(gone)
        gone.rmdir()  # a working directory removed: the site whole, and no error
        assert [leak.site for leak in guard.leaks()] == [f"{ROOT / HERE}:{taken}"]
        connection.close()
    finally:
        guard.stop()


def test_a_pool_without_an_engine_is_named_by_its_class(postgres_url: str) -> None:
    def connect() -> Any:
        return psycopg.connect(postgres_url)

    pool = QueuePool(connect, pool_size=1)
    guard = PoolGuard().start()
    try:
        connection = pool.connect(); taken = _line()  # noqa: E702  # fmt: skip
        assert raised_message(guard).splitlines() == [
            "1 connection still checked out at the end of the test:",
            f"  - taken at {HERE}:{taken} in test_a_pool_without_an_engine_is_named_by_its_class (pool QueuePool)",
        ]
        connection.close()
        guard.check()
    finally:
        guard.stop()
        pool.dispose()


# --- Routes -----------------------------------------------------------------------------------


def test_a_leak_names_the_route_of_the_request_that_took_it(engine: Engine) -> None:
    app = FastAPI()
    kept: list[Any] = []
    lines: dict[str, int] = {}

    @app.get("/users/{user_id}")
    def user(user_id: int) -> dict[str, int]:
        kept.append(engine.connect()); lines["http"] = _line()  # noqa: E702  # fmt: skip
        return {"id": user_id}

    @app.websocket("/ws/{room}")
    async def room(websocket: WebSocket, room: str) -> None:
        await websocket.accept()
        kept.append(engine.connect()); lines["ws"] = _line()  # noqa: E702  # fmt: skip
        await websocket.send_text(room)
        await websocket.close()

    watch = poolwatch.instrument(app, engine, registry=CollectorRegistry())
    guard = PoolGuard().start()
    try:
        with TestClient(app) as client:
            assert client.get("/users/7").json() == {"id": 7}
            with client.websocket_connect("/ws/lobby") as websocket:
                assert websocket.receive_text() == "lobby"
        prefix = "test_a_leak_names_the_route_of_the_request_that_took_it.<locals>"
        assert raised_message(guard).splitlines() == [
            "2 connections still checked out at the end of the test:",
            f"  - taken at {HERE}:{lines['http']} in {prefix}.user, route GET /users/{{user_id}} (pool guarded)",
            f"  - taken at {HERE}:{lines['ws']} in {prefix}.room, route /ws/{{room}} (pool guarded)",
        ]
    finally:
        guard.stop()
        for connection in kept:
            connection.close()
        watch.close()


def test_a_budget_names_the_routes_of_each_statement_aligned_by_count(engine: Engine) -> None:
    app = FastAPI()

    @app.get("/authors")
    def authors() -> int:
        with engine.connect() as connection:
            for n in range(10):
                connection.execute(sa.text("SELECT :n + 1"), {"n": n})
            connection.execute(sa.text("SELECT now()"))
        return 10

    @app.get("/books/{book_id}")
    def book(book_id: int) -> int:
        with engine.connect() as connection:
            return int(connection.execute(sa.text("SELECT :n + 1"), {"n": book_id}).scalar_one())

    watch = poolwatch.instrument(app, engine, registry=CollectorRegistry())
    try:
        client = TestClient(app)
        with pytest.raises(QueryBudgetExceeded) as raised, poolwatch.assert_queries(2, engine) as log:
            client.get("/authors")
            client.get("/books/3")
            with engine.connect() as connection:  # outside any request: no route
                connection.execute(sa.text("SELECT 'x'"))
        assert type(raised.value) is QueryBudgetExceeded
        assert str(raised.value).splitlines() == [
            "expected exactly 2 statements, 13 ran:",
            "  11 × SELECT ? + ?   [GET /authors, GET /books/{book_id}]",
            "   1 × SELECT now()   [GET /authors]",
            "   1 × SELECT ?",
        ]
        assert log.count == 13
        assert [(g.fingerprint, g.count, g.routes) for g in log.groups()][1:] == [
            ("SELECT now()", 1, ("GET /authors",)),
            ("SELECT ?", 1, ()),
        ]
    finally:
        watch.close()


def test_budgets_pass_at_their_limit_and_fail_one_past_it(engine: Engine) -> None:
    with poolwatch.assert_queries(1, engine) as log, engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
    assert log.count == 1
    with poolwatch.assert_max_queries(1) as log, engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
    assert log.fingerprints == ["SELECT ?"]
    with poolwatch.assert_max_queries(0, engine):
        pass
    budget = poolwatch.assert_max_queries(1, engine)
    with pytest.raises(QueryBudgetExceeded) as raised, budget, engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
        connection.execute(sa.text("SELECT 2"))
    assert str(raised.value) == "expected at most 1 statement, 2 ran:\n  2 × SELECT ?"
    with pytest.raises(QueryBudgetExceeded) as raised, poolwatch.assert_queries(1, engine):
        pass
    assert str(raised.value) == "expected exactly 1 statement, 0 ran:"
    for wrong in (-1, 2.0, False, None):
        with pytest.raises(TypeError) as refused:
            poolwatch.assert_queries(wrong)  # type: ignore[arg-type]
        assert str(refused.value) == (
            f"poolwatch: a query budget is a whole number of statements >= 0, got {wrong!r}"
        )


def test_a_budget_puts_back_the_engine_flag_it_found(engine: Engine) -> None:
    def listener(*args: Any) -> None:
        pass

    # SQLAlchemy leaves Engine._has_events set once a class-level listener was added and removed.
    sa.event.listen(Engine, "before_cursor_execute", listener)
    sa.event.remove(Engine, "before_cursor_execute", listener)
    try:
        assert Engine.__dict__["_has_events"] is True
        with poolwatch.assert_max_queries(1) as log, engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        assert log.count == 1
        assert Engine.__dict__["_has_events"] is True
    finally:
        Engine._has_events = False


def test_a_class_listener_added_during_a_budget_still_fires_after_it(engine: Engine) -> None:
    seen: list[str] = []

    def listener(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    try:
        with poolwatch.assert_max_queries(0):
            sa.event.listen(Engine, "before_cursor_execute", listener)
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        assert seen == ["SELECT 1"]
    finally:
        sa.event.remove(Engine, "before_cursor_execute", listener)
        Engine._has_events = False


# --- Connections held by asyncio tasks --------------------------------------------------------


async def test_a_task_holding_a_connection_when_the_test_returns_is_named(async_url: str) -> None:
    engine = create_async_engine(async_url, poolclass=NullPool, pool_logging_name="tasks")
    guard = PoolGuard().start()
    holding = asyncio.Event()
    lines: dict[str, int] = {}

    async def hold() -> None:
        async with engine.connect() as connection:
            lines["hold"] = _line() - 1
            await connection.execute(sa.text("SELECT 1"))
            holding.set()
            await asyncio.sleep(60)

    async def quick() -> Any:
        connection = await engine.connect(); lines["quick"] = _line()  # noqa: E702  # fmt: skip
        return connection

    try:
        task = asyncio.create_task(hold(), name="background-holder")
        await holding.wait()
        # A task that finished, its connection handed out and still open: held, by no task.
        handed = await asyncio.create_task(quick(), name="finished")
        guard.test_returned()
        prefix = "test_a_task_holding_a_connection_when_the_test_returns_is_named.<locals>"
        held = (
            f"  - taken at {HERE}:{lines['hold']} in {prefix}.hold, by task 'background-holder' (pool tasks)"
        )
        quick_line = f"  - taken at {HERE}:{lines['quick']} in {prefix}.quick (pool tasks)"
        assert raised_message(guard).splitlines() == [
            "2 connections still checked out at the end of the test:",
            held,
            quick_line,
        ]
        # The loop's shutdown cancels the task, which returns the connection: still a leak.
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert raised_message(guard).splitlines() == [
            "1 connection still checked out at the end of the test:",
            quick_line,
            f"1 connection {TASK_SECTION}",
            held,
        ]
        assert [(leak.task, leak.still_out) for leak in guard.leaks()] == [
            (None, True),
            ("background-holder", False),
        ]
        await handed.close()
        assert raised_message(guard).splitlines() == [f"1 connection {TASK_SECTION}", held]
    finally:
        guard.stop()
        await engine.dispose()


async def test_a_checkout_in_a_loop_callback_outside_any_task_is_followed(engine: Engine) -> None:
    guard = PoolGuard().start()
    kept: list[Any] = []
    taken = asyncio.Event()

    def callback() -> None:  # run by the loop itself: a running loop, no current task
        kept.append(engine.connect())
        taken.set()

    try:
        asyncio.get_running_loop().call_soon(callback)
        await taken.wait()
        assert [(leak.function, leak.task, leak.still_out) for leak in guard.leaks()] == [
            ("test_a_checkout_in_a_loop_callback_outside_any_task_is_followed.<locals>.callback", None, True)
        ]
        kept[0].close()
        guard.check()
    finally:
        guard.stop()


async def test_tasks_that_returned_their_connection_in_time_pass(async_url: str) -> None:
    engine = create_async_engine(async_url, poolclass=NullPool)
    guard = PoolGuard().start()

    async def quick() -> None:
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))

    try:
        await asyncio.create_task(quick(), name="in-time")
        guard.test_returned()
        guard.check()
        assert guard.leaks() == []
    finally:
        guard.stop()
        await engine.dispose()


# --- StaticPool and SingletonThreadPool: one shared record, every checkout followed -------------


def shared_record_steps(poolclass: type[Any], steps: Any, guarded: bool) -> list[object]:
    """What SQLAlchemy did (its checkin events) and what the guard saw, after each step."""
    engine = static_engine(poolclass)
    checkins = checkins_of(engine)
    guard = PoolGuard().start() if guarded else None
    seen: list[object] = []

    def look() -> None:
        seen.append(("checkins", list(checkins)))
        if guard is not None:
            seen.append([(leak.site, leak.pool, leak.reclaimed) for leak in guard.leaks()])

    try:
        steps(engine, look)
    finally:
        if guard is not None:
            guard.stop()
        engine.dispose()
    return seen


@pytest.mark.parametrize("poolclass", [StaticPool, SingletonThreadPool])
def test_a_shared_record_leak_is_reported_after_other_use_of_the_engine(poolclass: type[Any]) -> None:
    lines: dict[str, int] = {}

    def steps(engine: Engine, look: Any) -> None:
        kept = engine.connect(); lines["kept"] = _line()  # noqa: E702  # fmt: skip
        kept.execute(sa.text("SELECT 1"))
        with engine.connect() as other:
            other.execute(sa.text("SELECT 2"))
        with engine.connect() as again:
            again.execute(sa.text("SELECT 3"))
        look()
        kept.close()
        look()

    plain = shared_record_steps(poolclass, steps, guarded=False)
    seen = shared_record_steps(poolclass, steps, guarded=True)
    site = f"{HERE}:{lines['kept']}"
    assert seen == [plain[0], [(site, "sqlite:memory", False)], plain[1], []]

    engine = static_engine(poolclass)
    guard = PoolGuard().start()
    try:
        steps(engine, lambda: None)
        guard.check()
        kept = engine.connect(); taken = _line()  # noqa: E702  # fmt: skip
        with engine.connect() as other:
            other.execute(sa.text("SELECT 2"))
        function = "test_a_shared_record_leak_is_reported_after_other_use_of_the_engine"
        assert raised_message(guard).splitlines() == [
            "1 connection still checked out at the end of the test:",
            f"  - taken at {HERE}:{taken} in {function} (pool sqlite:memory)",
        ]
        kept.close()
        guard.check()
    finally:
        guard.stop()
        engine.dispose()


@pytest.mark.parametrize("poolclass", [StaticPool, SingletonThreadPool])
@pytest.mark.parametrize("close_first", ["first", "second"])
def test_shared_record_checkouts_returned_in_either_order_pass(
    poolclass: type[Any], close_first: str
) -> None:
    lines: dict[str, int] = {}

    def steps(engine: Engine, look: Any) -> None:
        first = engine.connect(); lines["first"] = _line()  # noqa: E702  # fmt: skip
        second = engine.connect(); lines["second"] = _line()  # noqa: E702  # fmt: skip
        (first if close_first == "first" else second).close()
        look()
        (second if close_first == "first" else first).close()
        look()
        with engine.connect() as again:
            again.execute(sa.text("SELECT 3"))
        look()

    plain = shared_record_steps(poolclass, steps, guarded=False)
    seen = shared_record_steps(poolclass, steps, guarded=True)
    # SingletonThreadPool hands a thread's second connect() the same pool checkout (no checkout
    # event): the one checkout is the first, out until both are closed.
    open_one = "second" if close_first == "first" and poolclass is StaticPool else "first"
    still_out = f"{HERE}:{lines[open_one]}"
    assert seen == [plain[0], [(still_out, "sqlite:memory", False)], plain[1], [], plain[2], []]


@pytest.mark.parametrize("poolclass", [StaticPool, SingletonThreadPool])
def test_a_shared_record_leak_in_a_request_names_its_route(poolclass: type[Any]) -> None:
    # FastAPI's testing docs: SQLite in memory on a StaticPool, shared with the app's threads.
    engine = static_engine(poolclass, pool_logging_name="lite")
    app = FastAPI()
    kept: list[Any] = []
    lines: dict[str, int] = {}

    @app.post("/items/{item_id}")
    def item(item_id: int) -> int:
        kept.append(engine.connect()); lines["site"] = _line()  # noqa: E702  # fmt: skip
        return item_id

    watch = poolwatch.instrument(app, engine, registry=CollectorRegistry())
    guard = PoolGuard().start()
    try:
        assert TestClient(app).post("/items/4").json() == 4
        prefix = "test_a_shared_record_leak_in_a_request_names_its_route.<locals>"
        assert raised_message(guard).splitlines() == [
            "1 connection still checked out at the end of the test:",
            f"  - taken at {HERE}:{lines['site']} in {prefix}.item, route POST /items/{{item_id}} (pool lite)",
        ]
    finally:
        guard.stop()
        for connection in kept:
            connection.close()
        watch.close()
        engine.dispose()


async def test_a_shared_record_checkout_held_by_a_task_is_named() -> None:
    engine = create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool, pool_logging_name="alite")
    guard = PoolGuard().start()
    holding = asyncio.Event()
    lines: dict[str, int] = {}

    async def hold() -> None:
        async with engine.connect() as connection:
            lines["hold"] = _line() - 1
            await connection.execute(sa.text("SELECT 1"))
            holding.set()
            await asyncio.sleep(60)

    try:
        task = asyncio.create_task(hold(), name="lite-holder")
        await holding.wait()
        guard.test_returned()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        prefix = "test_a_shared_record_checkout_held_by_a_task_is_named.<locals>"
        assert raised_message(guard).splitlines() == [
            f"1 connection {TASK_SECTION}",
            f"  - taken at {HERE}:{lines['hold']} in {prefix}.hold, by task 'lite-holder' (pool alite)",
        ]
    finally:
        guard.stop()
        await engine.dispose()


def test_two_guards_at_once_both_see_a_shared_record_checkout_returned() -> None:
    engine = static_engine()
    checkins = checkins_of(engine)
    outer = PoolGuard().start()
    inner = PoolGuard().start()
    try:
        connection = engine.connect()
        assert len(outer.leaks()) == len(inner.leaks()) == 1
        connection.close()
        assert outer.leaks() == inner.leaks() == []
        assert checkins == [("reset", False), "checkin"]
        with engine.connect() as again:  # the proxy's own checkin again, not a guard's leftover
            again.execute(sa.text("SELECT 1"))
        # Its transaction ended with the block: the pool is told so, and does not roll back again.
        assert checkins == [("reset", False), "checkin", ("reset", True), "checkin"]
        outer.check()
        inner.check()
    finally:
        inner.stop()
        outer.stop()
        engine.dispose()


def test_a_shared_record_checkout_dropped_unclosed_is_reported_as_reclaimed() -> None:
    engine = static_engine(pool_logging_name="lite")
    guard = PoolGuard().start()
    try:
        engine.connect(); taken = _line()  # noqa: E702  # fmt: skip
        gc.collect()
        with engine.connect() as other:
            other.execute(sa.text("SELECT 1"))
        function = "test_a_shared_record_checkout_dropped_unclosed_is_reported_as_reclaimed"
        assert raised_message(guard).splitlines() == [
            "1 connection never returned, reclaimed by the garbage collector:",
            f"  - taken at {HERE}:{taken} in {function} (pool lite)",
        ]
    finally:
        guard.stop()
        engine.dispose()


def test_a_shared_record_checkout_made_before_the_guard_is_not_its_own() -> None:
    engine = static_engine()
    before = engine.connect()
    guard = PoolGuard().start()
    try:
        with engine.connect() as during:
            during.execute(sa.text("SELECT 1"))
        guard.check()
        before.close()
        guard.check()
    finally:
        guard.stop()
        engine.dispose()


# --- only(), start() and stop() ---------------------------------------------------------------


def test_only_keeps_the_given_engines_leaks_reclaimed_ones_included(engine: Engine) -> None:
    other = static_engine(pool_logging_name="lite")
    guard = PoolGuard().start()
    try:
        mine: dict[str, object] = {"connection": engine.connect()}
        mine["self"] = mine
        theirs: dict[str, object] = {"connection": other.connect()}
        theirs["self"] = theirs
        del mine, theirs
        gc.collect()
        held = other.connect()
        assert sorted((leak.pool, leak.reclaimed) for leak in guard.leaks()) == [
            ("guarded", True),
            ("lite", False),
            ("lite", True),
        ]
        guard.only(engine)
        assert [(leak.pool, leak.reclaimed) for leak in guard.leaks()] == [("guarded", True)]
        late = engine.connect()  # taken after only(): its engine's checkouts are still followed
        assert [(leak.pool, leak.reclaimed) for leak in guard.leaks()] == [
            ("guarded", False),
            ("guarded", True),
        ]
        late.close()
        with other.connect():
            pass
        assert len(guard.leaks()) == 1
        guard.only(other)
        assert guard.leaks() == []  # what only(engine) dropped is not seen again
        held.close()
    finally:
        guard.stop()
        other.dispose()


async def test_only_takes_an_async_engine_and_refuses_nothing(async_url: str) -> None:
    engine = create_async_engine(async_url, poolclass=NullPool)
    guard = PoolGuard()
    try:
        assert guard.engines is None
        assert guard.only(engine) is guard
        assert guard.engines == (engine.sync_engine,)
        with pytest.raises(TypeError) as refused:
            guard.only()
        assert str(refused.value) == "poolwatch_guard.only() needs at least one Engine or AsyncEngine"
        for wrong in (lambda: guard.only("db"), lambda: poolwatch.assert_max_queries(1, "db")):  # type: ignore[arg-type]
            with pytest.raises(TypeError) as refused:
                wrong()
            assert str(refused.value) == (
                "poolwatch: an engine to guard must be a SQLAlchemy Engine or AsyncEngine, an asyncpg Pool, "
                "or a psycopg_pool ConnectionPool or AsyncConnectionPool, got builtins.str"
            )
    finally:
        await engine.dispose()


def test_started_twice_stopped_once_leaves_no_listener(engine: Engine) -> None:
    guard = PoolGuard()
    assert guard.start() is guard
    assert guard.start() is guard
    assert active_listeners() == (1, 0)
    guard.stop()
    assert active_listeners() == (0, 0)
    connection = engine.connect()  # not followed once stopped
    try:
        assert guard.leaks() == []
    finally:
        connection.close()
    guard.stop()  # a second stop is harmless
    guard.start()  # and a stopped guard starts again, following checkouts again
    try:
        connection = engine.connect()
        assert len(guard.leaks()) == 1
        connection.close()
        guard.check()
    finally:
        guard.stop()


def test_a_guard_narrowed_to_another_engine_hides_no_return_from_the_next(engine: Engine) -> None:
    other = static_engine()
    narrowed = PoolGuard().start()
    guard = PoolGuard().start()
    try:
        connection = engine.connect()
        narrowed.only(other)  # drops the checkout it had followed, before the return is seen
        connection.close()
        guard.check()
        narrowed.check()
    finally:
        guard.stop()
        narrowed.stop()
        other.dispose()


# --- Driver pools (asyncpg, psycopg_pool), watched by poolwatch --------------------------------


async def test_a_watched_asyncpg_pool_leak_from_the_test_is_reported(postgres_url: str) -> None:
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=3)
    other = await asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
    watch = poolwatch.watch({"apg": pool, "other": other}, registry=CollectorRegistry())
    guard = PoolGuard()
    before = await pool.acquire()  # before the guard started: a fixture's, not the test's
    guard.start()
    try:
        during = await pool.acquire(); taken = _line()  # noqa: E702  # fmt: skip
        function = "test_a_watched_asyncpg_pool_leak_from_the_test_is_reported"
        assert raised_message(guard).splitlines() == [
            "1 connection still checked out at the end of the test:",
            f"  - taken at {HERE}:{taken} in {function} (pool apg)",
        ]
        guard.only(other)
        guard.check()
        guard.only(pool)
        assert [leak.pool for leak in guard.leaks()] == ["apg"]
        await pool.release(during)
        guard.check()
    finally:
        guard.stop()
        await pool.release(before)
        watch.close()
        await pool.close()
        await other.close()


def test_a_watched_psycopg_pool_leak_names_its_route(postgres_url: str) -> None:
    pool = psycopg_pool.ConnectionPool(postgres_url, min_size=1, max_size=2, open=True)
    app = FastAPI()
    kept: list[Any] = []
    lines: dict[str, int] = {}

    @app.get("/orders/{order_id}")
    def order(order_id: int) -> int:
        kept.append(pool.getconn()); lines["site"] = _line()  # noqa: E702  # fmt: skip
        return order_id

    watch = poolwatch.instrument(app, pool, registry=CollectorRegistry(), name="psy")
    guard = PoolGuard().start()
    try:
        with TestClient(app) as client:
            assert client.get("/orders/5").json() == 5
        prefix = "test_a_watched_psycopg_pool_leak_names_its_route.<locals>"
        assert raised_message(guard).splitlines() == [
            "1 connection still checked out at the end of the test:",
            f"  - taken at {HERE}:{lines['site']} in {prefix}.order, route GET /orders/{{order_id}} (pool psy)",
        ]
    finally:
        guard.stop()
        for connection in kept:
            pool.putconn(connection)
        watch.close()
        pool.close()


def test_a_late_close_or_collection_under_a_reused_id_never_touches_the_newer_checkout() -> None:
    """Shared-record checkouts are keyed by their proxy's ``id()``, which CPython may give a new
    proxy once the old one is gone. The old proxy's late close, or its late finalization, must then
    leave the newer checkout filed under that id alone. The reuse is set up by filing the newer
    checkout under the older one's id (CPython gives no way to force an address)."""
    engine = static_engine()
    guard = PoolGuard().start()
    try:
        older = engine.connect()
        (older_key,) = guard._open
        older_checkout = guard._open[older_key]
        newer = engine.connect()
        (newer_key,) = (key for key in guard._open if key != older_key)
        newer_checkout = guard._open.pop(newer_key)
        guard._open[older_key] = newer_checkout  # the newer proxy now has the older one's id
        older.close()
        assert guard._open == {older_key: newer_checkout}
        guard._gone(older_key, older_checkout)  # the older proxy's weak reference fires late
        assert guard._open == {older_key: newer_checkout}
        assert guard._reclaimed == []
        guard._gone(older_key, newer_checkout)  # the newer one collected unclosed: reclaimed
        assert guard._open == {}
        assert guard._reclaimed == [newer_checkout]
        newer.close()
        guard._reclaimed.clear()
        guard.check()
    finally:
        guard.stop()
        engine.dispose()
