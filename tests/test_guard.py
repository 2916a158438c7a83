"""The guards' own API, in this process: budgets, the leak check, and what they leave behind."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

import poolwatch
from poolwatch._guard import ConnectionLeaked, QueryBudgetExceeded, active_listeners


@pytest.fixture
def engine(sync_url: str) -> Iterator[Engine]:
    engine = sa.create_engine(sync_url, pool_size=2)
    yield engine
    engine.dispose()


def _line() -> int:
    frame = __import__("sys")._getframe(1)
    return int(frame.f_lineno)


def nothing_left_behind() -> None:
    assert active_listeners() == (0, 0)
    for target in (Pool, Engine):
        for name in target.dispatch._event_names:
            for listeners in getattr(target.dispatch, name)._clslevel.values():
                assert not [fn for fn in listeners if fn.__module__.startswith("poolwatch")], name
    assert Engine.__dict__["_has_events"] is False


def test_an_exact_budget_fails_on_fewer_statements_too(engine: Engine) -> None:
    with pytest.raises(QueryBudgetExceeded) as raised, poolwatch.assert_queries(3), engine.connect() as c:
        c.execute(sa.text("SELECT 1"))
        c.execute(sa.text("SELECT 2"))
    assert str(raised.value).splitlines() == ["expected exactly 3 statements, 2 ran:", "  2 × SELECT ?"]
    nothing_left_behind()


def test_groups_most_repeated_first_ties_in_the_order_first_run(engine: Engine) -> None:
    budget = poolwatch.assert_max_queries(1, engine)
    with pytest.raises(QueryBudgetExceeded) as raised, budget, engine.connect() as c:
        c.execute(sa.text("SELECT 'a' || 'b'"))
        c.execute(sa.text("SELECT now()"))
        for n in range(3):
            c.execute(sa.text("SELECT :n + 1"), {"n": n})
    assert str(raised.value).splitlines() == [
        "expected at most 1 statement, 5 ran:",
        "  3 × SELECT ? + ?",
        "  1 × SELECT ? || ?",
        "  1 × SELECT now()",
    ]
    nothing_left_behind()


def test_a_budget_counts_only_the_engines_it_was_given(engine: Engine, sync_url: str) -> None:
    other = sa.create_engine(sync_url)
    try:
        with poolwatch.assert_queries(1, engine) as log:
            with engine.connect() as c:
                c.execute(sa.text("SELECT 1"))
            with other.connect() as c:
                c.execute(sa.text("SELECT 1"))
                c.execute(sa.text("SELECT 2"))
        assert log.fingerprints == ["SELECT ?"]
    finally:
        other.dispose()
    nothing_left_behind()


def test_the_blocks_own_error_is_never_replaced(engine: Engine) -> None:
    with pytest.raises(ZeroDivisionError), poolwatch.assert_max_queries(0), engine.connect() as c:
        c.execute(sa.text("SELECT 1"))
        _ = 1 / 0
    nothing_left_behind()


def test_a_budget_must_be_a_whole_number() -> None:
    for wrong in (-1, 1.5, True, "3"):
        with pytest.raises(TypeError, match="whole number"):
            poolwatch.assert_max_queries(wrong)  # type: ignore[arg-type]


def test_check_names_the_held_connection_then_passes_once_returned(engine: Engine) -> None:
    guard = poolwatch.PoolGuard().start()
    try:
        connection = engine.connect(); taken = _line()  # noqa: E702  # fmt: skip
        with pytest.raises(ConnectionLeaked) as raised:
            guard.check()
        assert (
            f"test_guard.py:{taken} in test_check_names_the_held_connection_then_passes_once_returned"
            in str(raised.value)
        )
        assert "1 connection still checked out" in str(raised.value)
        connection.close()
        guard.check()
    finally:
        guard.stop()
    nothing_left_behind()


def test_a_connection_in_a_reference_cycle_is_reported_as_reclaimed(engine: Engine) -> None:
    guard = poolwatch.PoolGuard().start()
    try:
        holder: dict[str, object] = {"connection": engine.connect()}
        holder["self"] = holder  # only the garbage collector can free it
        del holder
        leaks = guard.leaks()  # collects first
        assert [leak.reclaimed for leak in leaks] == [True]
        assert leaks[0].function == "test_a_connection_in_a_reference_cycle_is_reported_as_reclaimed"
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        guard.stop()
        gc.collect()
    nothing_left_behind()


def test_only_narrows_the_guard_to_its_engines(engine: Engine, sync_url: str) -> None:
    other = sa.create_engine(sync_url)
    guard = poolwatch.PoolGuard().start()
    try:
        mine = engine.connect()
        theirs = other.connect()
        assert len(guard.leaks()) == 2
        assert guard.only(engine) is guard and guard.engines == (engine,)
        assert [leak.function for leak in guard.leaks()] == ["test_only_narrows_the_guard_to_its_engines"]
        mine.close()
        assert guard.leaks() == []
        theirs.close()
    finally:
        guard.stop()
        other.dispose()
    nothing_left_behind()
