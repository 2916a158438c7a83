"""The pytest plugin's hooks and fixture, run by pytest in this process (``runpytest_inprocess``).

tests/test_pytest_plugin.py runs the same kind of suites in subprocesses, where the plugin is found
through its entry point as a user's suite finds it; here each report is read whole from pytest's
own report objects: the teardown error of a leak, the failure of a budget, their exact text, and
that nothing else (no traceback, no second report) comes with them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

# Imported here, not first by the suite run inside: pytester takes back the modules a run imported,
# and a C extension (asyncpg's, greenlet) imported a second time crashes the interpreter.
import asyncpg  # type: ignore[import-untyped]  # noqa: F401
import pytest
import sqlalchemy.dialects.postgresql.asyncpg
import sqlalchemy.dialects.postgresql.psycopg
import sqlalchemy.ext.asyncio  # noqa: F401

from poolwatch._guard import active_listeners
from tests.test_pytest_plugin import line_of

pytest_plugins = ("pytester",)

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
asyncio_default_test_loop_scope = function
"""

SUITE = """
import asyncio
import os

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

import poolwatch

engine = sa.create_engine(os.environ["INPROC_SYNC_URL"], pool_size=5, pool_logging_name="shop")
other = sa.create_engine(os.environ["INPROC_SYNC_URL"], pool_size=5, pool_logging_name="other")
kept = []


def test_leak(poolwatch_guard):
    kept.append(engine.connect())  # LEAK-SITE


def test_clean(poolwatch_guard):
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))


def test_fails_on_its_own(poolwatch_guard):
    kept.append(engine.connect())
    assert 1 + 1 == 3, "its own failure"


def test_skips_on_its_own(poolwatch_guard):
    kept.append(engine.connect())
    pytest.skip("its own skip")


@pytest.mark.xfail(reason="known", strict=True)
def test_expected_to_fail(poolwatch_guard):
    kept.append(engine.connect())
    assert False


def test_only_another_engine_leaks(poolwatch_guard):
    poolwatch_guard.only(engine)
    kept.append(other.connect())


@pytest.fixture
def broken_teardown():
    yield
    raise RuntimeError("the fixture's own teardown error")


def test_a_fixture_teardown_fails(poolwatch_guard, broken_teardown):
    kept.append(engine.connect())


@pytest.mark.max_queries(1)
def test_over_budget():
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
        connection.execute(sa.text("SELECT 2"))


@pytest.mark.max_queries(n=2)
def test_at_budget():
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
        connection.execute(sa.text("SELECT 2"))


@pytest.mark.max_queries(1)
def test_only_the_guarded_engine_counts(poolwatch_guard):
    poolwatch_guard.only(engine)
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
    with other.connect() as connection:
        connection.execute(sa.text("SELECT 2"))
        connection.execute(sa.text("SELECT 3"))


@pytest.mark.max_queries(0)
def test_own_failure_over_budget():
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
    raise ValueError("its own error")


@pytest.mark.max_queries(1, 2)
def test_two_numbers():
    pass


@pytest.mark.max_queries(m=1)
def test_wrong_keyword():
    pass


@pytest.mark.max_queries("1")
def test_not_a_number():
    pass


async def hold(engine, holding):
    async with engine.connect() as connection:  # TASK-SITE
        await connection.execute(sa.text("SELECT 1"))
        holding.set()
        await asyncio.sleep(60)


async def test_task_outlives_the_test(poolwatch_guard):
    engine = create_async_engine(os.environ["INPROC_ASYNC_URL"], poolclass=NullPool, pool_logging_name="tasks")
    holding = asyncio.Event()
    kept.append(asyncio.create_task(hold(engine, holding), name="background-holder"))
    await holding.wait()  # the task has its connection when the test returns


async def test_task_in_time(poolwatch_guard):
    engine = create_async_engine(os.environ["INPROC_ASYNC_URL"], poolclass=NullPool)

    async def quick():
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))

    await asyncio.create_task(quick())
    await engine.dispose()


def test_check_fails_at_the_users_line(poolwatch_guard):
    kept.append(engine.connect())
    poolwatch_guard.check()  # CHECK-LINE


def test_budget_fails_at_the_users_line():
    with poolwatch.assert_max_queries(0), engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))


def test_zz_release():
    for connection in kept:
        if not isinstance(connection, asyncio.Task):
            connection.close()
"""


def reports(result: pytest.RunResult) -> dict[tuple[str, str], Any]:
    """Each test's report per phase, by (test name, phase)."""
    found = {}
    for report in result.reprec.getreports("pytest_runtest_logreport"):  # type: ignore[attr-defined]
        found[(report.nodeid.split("::")[-1], report.when)] = report
    return found


Reports = dict[tuple[str, str], Any]


@pytest.fixture
def run_suite(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, postgres_url: str
) -> Callable[[], Reports]:
    """Runs the suite above, by pytest in this process: each test's reports by name and phase.

    Run inside each test that reads it (not in this fixture's setup), so that a mutation test
    finds what each one checks and times it as what it is."""

    def run() -> Reports:
        monkeypatch.setenv(
            "INPROC_SYNC_URL", postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)
        )
        monkeypatch.setenv(
            "INPROC_ASYNC_URL", postgres_url.replace("postgresql://", "postgresql+asyncpg://", 1)
        )
        pytester.makeini(INI)
        pytester.makepyfile(test_inproc_suite=SUITE)
        result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--strict-markers")
        assert active_listeners() == (0, 0)
        return reports(result)

    return run


def outcomes(ran: Reports, name: str) -> list[str]:
    return [ran[(name, when)].outcome for when in ("setup", "call", "teardown") if (name, when) in ran]


def test_a_leak_is_an_error_at_teardown_reading_only_the_report(run_suite: Callable[[], Reports]) -> None:
    ran = run_suite()
    assert outcomes(ran, "test_leak") == ["passed", "passed", "failed"]
    site = f"test_inproc_suite.py:{line_of(SUITE, 'LEAK-SITE')}"
    assert str(ran[("test_leak", "teardown")].longrepr) == (
        "poolwatch_guard: 1 connection still checked out at the end of the test:\n"
        f"  - taken at {site} in test_leak (pool shop)"
    )
    assert outcomes(ran, "test_clean") == ["passed", "passed", "passed"]


def test_a_test_that_did_not_pass_gets_no_leak_report(run_suite: Callable[[], Reports]) -> None:
    ran = run_suite()
    assert outcomes(ran, "test_fails_on_its_own") == ["passed", "failed", "passed"]
    assert "its own failure" in str(ran[("test_fails_on_its_own", "call")].longrepr)
    assert outcomes(ran, "test_skips_on_its_own") == ["passed", "skipped", "passed"]
    assert outcomes(ran, "test_expected_to_fail") == ["passed", "skipped", "passed"]
    assert hasattr(ran[("test_expected_to_fail", "call")], "wasxfail")


def test_only_narrows_the_fixture_and_its_budget(run_suite: Callable[[], Reports]) -> None:
    ran = run_suite()
    assert outcomes(ran, "test_only_another_engine_leaks") == ["passed", "passed", "passed"]
    assert outcomes(ran, "test_only_the_guarded_engine_counts") == ["passed", "passed", "passed"]


def test_a_fixtures_teardown_error_is_reported_and_the_guard_still_stops(
    run_suite: Callable[[], Reports],
) -> None:
    ran = run_suite()
    teardown = ran[("test_a_fixture_teardown_fails", "teardown")]
    assert teardown.outcome == "failed"
    assert "RuntimeError: the fixture's own teardown error" in str(teardown.longrepr)
    # run_suite checked that no guard or budget is left listening.


def test_a_budget_fails_the_call_with_its_statements_and_nothing_else(
    run_suite: Callable[[], Reports],
) -> None:
    ran = run_suite()
    assert outcomes(ran, "test_over_budget") == ["passed", "failed", "passed"]
    assert str(ran[("test_over_budget", "call")].longrepr) == (
        "@pytest.mark.max_queries(1): expected at most 1 statement, 2 ran:\n  2 × SELECT ?"
    )
    assert outcomes(ran, "test_at_budget") == ["passed", "passed", "passed"]
    own = str(ran[("test_own_failure_over_budget", "call")].longrepr)
    assert "ValueError: its own error" in own and "max_queries" not in own.split("ValueError")[-1]


def test_a_wrong_marker_is_refused(run_suite: Callable[[], Reports]) -> None:
    ran = run_suite()
    for name in ("test_two_numbers", "test_wrong_keyword"):
        assert outcomes(ran, name) == ["passed", "failed", "passed"]
        assert str(ran[(name, "call")].longrepr.reprcrash.message) == (
            "TypeError: poolwatch: use @pytest.mark.max_queries(n) with one whole number n"
        )
    assert str(ran[("test_not_a_number", "call")].longrepr.reprcrash.message) == (
        "TypeError: poolwatch: a query budget is a whole number of statements >= 0, got '1'"
    )


def test_a_connection_held_by_a_task_past_the_test_is_a_leak(run_suite: Callable[[], Reports]) -> None:
    ran = run_suite()
    site = f"test_inproc_suite.py:{line_of(SUITE, 'TASK-SITE')}"
    assert outcomes(ran, "test_task_outlives_the_test") == ["passed", "passed", "failed"]
    assert str(ran[("test_task_outlives_the_test", "teardown")].longrepr) == (
        "poolwatch_guard: 1 connection held by an asyncio task still running when the test returned "
        "(cancelled since by the event loop's shutdown, which returned it):\n"
        f"  - taken at {site} in hold, by task 'background-holder' (pool tasks)"
    )
    assert outcomes(ran, "test_task_in_time") == ["passed", "passed", "passed"]


def test_the_marker_is_registered_and_described(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--markers")
    assert (
        "@pytest.mark.max_queries(n): fail the test if its body runs more than n SQL statements (poolwatch)"
        in result.stdout.lines
    )


def test_a_guard_or_budget_failure_points_at_the_test_not_at_poolwatch(
    run_suite: Callable[[], Reports],
) -> None:
    ran = run_suite()
    # poolwatch's own frames are hidden (``__tracebackhide__``): the user's line is the last shown.
    check = str(ran[("test_check_fails_at_the_users_line", "call")].longrepr)
    assert "poolwatch_guard.check()  # CHECK-LINE" in check
    assert re.search(r"^E +poolwatch\._guard\.ConnectionLeaked: 1 connection still checked out", check, re.M)
    budget = str(ran[("test_budget_fails_at_the_users_line", "call")].longrepr)
    assert re.search(
        r"^E +poolwatch\._guard\.QueryBudgetExceeded: expected at most 0 statements, 1 ran:", budget, re.M
    )
    for shown in (check, budget):
        for internal in ("raise ConnectionLeaked(", "raise QueryBudgetExceeded(", "self.log.check("):
            assert internal not in shown
