"""The starvation check's thread and its report of who holds the pool, in process.

tests/test_threadpool.py drives the check itself through a real hang; tests/test_threadpool_
starvation.py the whole story in a served app (a process of its own). Here: the one thread that
runs every check (started with the first, ended with the last, a failing check counted and the
others still run) and the routes the event names, most connections first.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import poolwatch
from poolwatch._log import internal_errors
from poolwatch._record.context import RequestContext, current_request
from poolwatch._serve.starvation import StarvationCheck, StarvationWatcher, routes_holding

# Generous: the watcher's thread is asked to check every 10 ms; a loaded machine may be slow to
# run it, never this slow.
BOUND_SECONDS = 30.0


class _CountingCheck(StarvationCheck):
    """A check that only counts how often the watcher ran it (and fails when told to)."""

    def __init__(self, *, fails: bool = False) -> None:
        self.calls = 0
        self.fails = fails

    def check(self, now: float | None = None) -> None:
        self.calls += 1
        if self.fails:
            raise RuntimeError("this check fails")


def _until(condition: object, what: str) -> None:
    deadline = time.monotonic() + BOUND_SECONDS
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _watcher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "poolwatch-starvation-check"]


def test_one_thread_runs_every_check_and_ends_with_the_last() -> None:
    before = len(_watcher_threads())  # the process-wide watcher may be running for other tests
    watcher = StarvationWatcher(interval=0.01)
    first, second = _CountingCheck(), _CountingCheck()
    watcher.add(first)
    watcher.add(second)
    threads = _watcher_threads()
    assert len(threads) == before + 1, "one thread for the watcher, however many checks"
    (thread,) = [t for t in threads if t is watcher._thread]
    assert thread.daemon
    _until(lambda: first.calls >= 3 and second.calls >= 3, "the watcher's thread never ran the checks")

    watcher.discard(first)
    calls = first.calls
    _until(lambda: second.calls >= calls + 3, "the remaining check stopped running")
    assert first.calls <= calls + 1, "a discarded check kept running"  # at most a run under way
    assert thread.is_alive(), "the thread ended while a check was left"

    watcher.discard(second)
    thread.join(BOUND_SECONDS)
    assert not thread.is_alive(), "the thread outlived the last check"
    assert watcher._thread is None

    # A check added later starts a new thread.
    third = _CountingCheck()
    watcher.add(third)
    assert watcher._thread is not None and watcher._thread is not thread
    _until(lambda: third.calls >= 1, "the new thread never ran its check")
    watcher.discard(third)
    watcher._thread.join(BOUND_SECONDS)


def test_it_waits_its_interval_between_runs() -> None:
    watcher = StarvationWatcher(interval=3600)
    check = _CountingCheck()
    watcher.add(check)
    try:
        time.sleep(0.5)
        assert check.calls == 0, "the watcher ran before its interval had passed"
    finally:
        thread = watcher._thread
        watcher.discard(check)
    assert thread is not None
    # Discarding the last check wakes the thread at once, whatever its interval.
    thread.join(BOUND_SECONDS)
    assert not thread.is_alive()
    assert check.calls == 0


def test_a_failing_check_is_counted_and_the_others_still_run() -> None:
    watcher = StarvationWatcher(interval=0.01)
    failing, working = _CountingCheck(fails=True), _CountingCheck()
    errors_before = internal_errors.count
    watcher.add(failing)
    watcher.add(working)
    try:
        _until(lambda: failing.calls >= 3 and working.calls >= 3, "a failing check stopped the others")
        assert internal_errors.count - errors_before >= 3
    finally:
        thread = watcher._thread
        watcher.discard(failing)
        watcher.discard(working)
    assert thread is not None
    thread.join(BOUND_SECONDS)
    assert internal_errors.count - errors_before == failing.calls


def test_a_check_nobody_keeps_is_dropped() -> None:
    watcher = StarvationWatcher(interval=0.01)
    check = _CountingCheck()
    watcher.add(check)
    thread = watcher._thread
    assert thread is not None
    del check
    gc.collect()
    # Nothing left to check: the thread ends at its next wake-up.
    thread.join(BOUND_SECONDS)
    assert not thread.is_alive()
    assert watcher._thread is None


def test_check_now_runs_each_check_once() -> None:
    watcher = StarvationWatcher(interval=3600)
    checks = [_CountingCheck(), _CountingCheck(fails=True), _CountingCheck()]
    for check in checks:
        watcher._checks[id(check)] = check  # without starting the thread
    errors_before = internal_errors.count
    watcher.check_now()
    assert [check.calls for check in checks] == [1, 1, 1]
    assert internal_errors.count == errors_before + 1


# -- who holds the pool -------------------------------------------------------------------------


@pytest.fixture
def engine(sync_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sync_url, pool_size=7, max_overflow=0)
    yield engine
    engine.dispose()


def _connect_under(engine: sa.Engine, route: str | None) -> sa.Connection:
    if route is None:
        return engine.connect()
    request = RequestContext({"type": "http", "route": None})
    request.resolved_route = route
    token = current_request.set(request)
    try:
        return engine.connect()
    finally:
        current_request.reset(token)


def test_routes_holding_counts_each_route_most_first_then_by_name(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    watch = poolwatch.watch(engine, registry=registry, name="held")
    (recorder,) = watch.recorders
    held = [
        _connect_under(engine, route)
        # /b 3, /c 2, then the ties by name: /a 1 before <none> 1, taken the other way round
        for route in ("/c", "/b", None, "/b", "/a", "/b", "/c")
    ]
    try:
        assert list(routes_holding(recorder).items()) == [("/b", 3), ("/c", 2), ("/a", 1), ("<none>", 1)]
    finally:
        for connection in held:
            connection.close()
    assert routes_holding(recorder) == {}
    watch.close()
