"""pytest plugin: fail a test that leaks a connection or runs more statements than its budget.

Registered through the ``pytest11`` entry point, so installing poolwatch is enough. It stays inert
until a test uses it: this module imports only pytest, which is loaded already, and poolwatch's
guards (with SQLAlchemy) are imported the first time a test asks for ``poolwatch_guard`` or
carries ``@pytest.mark.max_queries``. It never touches a Prometheus registry.

- ``poolwatch_guard`` (fixture): follows every checkout of every SQLAlchemy pool in the process,
  and of every asyncpg or psycopg_pool pool that poolwatch watches, from the moment the fixture
  is set up, or only the pools of ``poolwatch_guard.only(engine_or_pool, ...)``. The
  check runs once the test's function-scoped fixtures are torn down (a fixture's session may
  rightly hold a connection until then), so a leak is reported as an error at the test's teardown,
  naming where each connection was taken and for which route. A test that failed on its own is
  reported as it is, without a leak report on top (its traceback may be what holds a connection).
- ``@pytest.mark.max_queries(n)``: the test body may run at most ``n`` statements; with the guard
  narrowed by ``only()``, only those engines' statements count.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ._guard import PoolGuard

_GUARD = pytest.StashKey["PoolGuard"]()
_DID_NOT_PASS = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "max_queries(n): fail the test if its body runs more than n SQL statements (poolwatch)",
    )


@pytest.fixture
def poolwatch_guard(request: pytest.FixtureRequest) -> Iterator[PoolGuard]:
    """Fails the test if a connection taken during it is not returned to its pool."""
    from ._guard import PoolGuard

    guard = PoolGuard().start()
    request.node.stash[_GUARD] = guard
    # Checked (and stopped) in pytest_runtest_teardown, after every function fixture is torn down.
    yield guard


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    try:
        return (yield from _run_with_budget(item))
    finally:
        # As the test function returns: note connections that asyncio tasks still running hold
        # (the loop's shutdown at fixture teardown would cancel them and return them unseen).
        guard = item.stash.get(_GUARD, None)
        if guard is not None:
            guard.test_returned()


def _run_with_budget(item: pytest.Item) -> Generator[None, Any, Any]:
    marker = item.get_closest_marker("max_queries")
    if marker is None:
        return (yield)
    from ._guard import QueryBudgetExceeded, QueryLog, max_queries_of

    limit = max_queries_of(marker.args, marker.kwargs)
    log = QueryLog().start()
    try:
        result = yield  # the test's own failure propagates as it is
    finally:
        log.stop()
    guard = item.stash.get(_GUARD, None)
    if guard is not None:
        log.restrict(guard.engines)
    try:
        log.check(limit)
    except QueryBudgetExceeded as error:
        message = str(error)
    else:
        return result
    pytest.fail(f"@pytest.mark.max_queries({limit}): {message}", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    # Failed, skipped or xfailed: its traceback may hold a connection; it is reported as it is.
    if not report.passed and _GUARD in item.stash:
        item.stash[_DID_NOT_PASS] = True
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, Any, Any]:
    guard = item.stash.get(_GUARD, None)
    if guard is None:
        return (yield)
    try:
        result = yield
    finally:
        leaks = [] if item.stash.get(_DID_NOT_PASS, False) else guard.leaks()
        guard.stop()  # even when a fixture's teardown raised
    if leaks:
        from ._guard import leak_message

        pytest.fail(f"poolwatch_guard: {leak_message(leaks)}", pytrace=False)
    return result
