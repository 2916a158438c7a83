"""The test guard follows checkouts, not connection records, and sees past the event loop's shutdown.

- StaticPool (FastAPI's own testing docs use it with SQLite) hands its one record to every
  checkout and checks it in once: a leaked connection followed by any other use of the engine used
  to pass silently.
- A connection held by an asyncio task still running when the test returns is returned by the
  loop's shutdown (pytest-asyncio cancels the task) before the guard looked: it used to pass too.

Real pytest runs in a subprocess, as a user's suite finds the plugin (its entry point).
"""

from __future__ import annotations

import pytest

from tests.test_pytest_plugin import INI, line_of, section

# pytest-asyncio's default: a loop per test, closed (its tasks cancelled) at the test's teardown.
FUNCTION_LOOP_INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
asyncio_default_test_loop_scope = function
"""

pytest_plugins = ("pytester",)

STATIC_TESTS = """
import sqlalchemy as sa
from sqlalchemy.pool import StaticPool

engine = sa.create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
kept = []


def test_leak_then_other_use(poolwatch_guard):
    connection = engine.connect()  # STATIC-LEAK
    connection.execute(sa.text("SELECT 1"))
    kept.append(connection)
    with engine.connect() as other:
        other.execute(sa.text("SELECT 2"))


def test_two_at_once_both_returned(poolwatch_guard):
    first = engine.connect()
    second = engine.connect()
    second.close()
    first.close()
    with engine.connect() as again:
        again.execute(sa.text("SELECT 3"))


def test_zz_release_the_kept_one():
    for connection in kept:
        connection.close()
"""

TASK_TESTS = """
import asyncio
import os

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

# A loop per test: no pooled connection may outlive its loop.
engine = create_async_engine(os.environ["GUARD_ASYNC_URL"], poolclass=NullPool)
tasks = []


async def hold_for_a_while():
    async with engine.connect() as connection:  # TASK-SITE
        await connection.execute(sa.text("SELECT 1"))
        await asyncio.sleep(30)


async def test_a_task_outlives_the_test(poolwatch_guard):
    task = asyncio.create_task(hold_for_a_while(), name="background-holder")
    tasks.append(task)
    await asyncio.sleep(0.2)  # the task has its connection when the test returns


async def test_a_task_that_finishes_in_time(poolwatch_guard):
    async def quick():
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))

    await asyncio.create_task(quick())


async def test_zz_dispose():
    await engine.dispose()
"""


def test_a_static_pool_leak_is_reported_after_other_use_of_the_engine(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(test_static=STATIC_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    output = result.stdout.str()
    result.assert_outcomes(passed=3, errors=1)
    leak = section(output, "ERROR at teardown of test_leak_then_other_use")
    assert "poolwatch_guard: 1 connection still checked out at the end of the test:" in leak
    assert (
        f"taken at test_static.py:{line_of(STATIC_TESTS, 'STATIC-LEAK')} in test_leak_then_other_use" in leak
    )
    assert "ERROR at teardown of test_two_at_once_both_returned" not in output


def test_a_connection_held_by_a_task_still_running_is_reported(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, async_url: str
) -> None:
    monkeypatch.setenv("GUARD_ASYNC_URL", async_url)
    pytester.makeini(FUNCTION_LOOP_INI)
    pytester.makepyfile(test_tasks=TASK_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    output = result.stdout.str()
    result.assert_outcomes(passed=3, errors=1)
    leak = section(output, "ERROR at teardown of test_a_task_outlives_the_test")
    assert "1 connection held by an asyncio task still running when the test returned" in leak
    assert (
        f"taken at test_tasks.py:{line_of(TASK_TESTS, 'TASK-SITE')} in hold_for_a_while, "
        "by task 'background-holder'" in leak
    )
    assert "ERROR at teardown of test_a_task_that_finishes_in_time" not in output
