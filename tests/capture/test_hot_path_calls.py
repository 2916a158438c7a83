"""What one checkout + checkin, and one statement, cost in Python calls (SQLAlchemy's
``test/aaa_profiling`` style, counted exactly instead of timed).

On this path a Python call costs as much as poolwatch's bookkeeping itself, so the hooks keep it
inline (see ``_capture/pool_hooks.py``). Every Python-level call made during one cycle is counted
with ``sys.setprofile``, with and without poolwatch on an otherwise identical engine (a real
QueuePool over fake DBAPI connections, so no database and no driver code varies). The difference
must be exactly poolwatch's own frames listed here: a new call on the hot path, in poolwatch or in
SQLAlchemy because of poolwatch (a listener, say), fails this test. If a change is worth a call,
update the numbers here and say why in the commit.
"""

from __future__ import annotations

import gc
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import poolwatch
from tests.fake_dbapi import fake_engine

POOLWATCH = str(Path(poolwatch.__file__).parent)

# (module, function) -> calls per cycle, for a checkout made by application code itself.
CHECKOUT_CHECKIN = {
    ("pool_hooks", "hook_pool.<locals>.connect"): 1,
    ("pool_hooks", "hook_pool.<locals>.do_return_conn"): 1,
}
# engine.connect() + one statement + close: the checkout comes from inside SQLAlchemy, so the
# borrow site is found by walking out of library frames (one call, however deep).
CONNECT_EXECUTE_CLOSE = {
    ("pool_hooks", "hook_pool.<locals>.connect"): 1,
    ("borrow_site", "borrow_site"): 1,
    ("borrow_site", "application_frame"): 1,
    ("dialect_hooks", "hook_dialect.<locals>.do_execute"): 1,
    ("dialect_hooks", "_StatementTimer.__init__.<locals>.finished"): 1,
    ("pool_hooks", "hook_pool.<locals>.do_return_conn"): 1,
}


def python_calls(body: Callable[[], Any]) -> Counter[tuple[str, str]]:
    """(file, function) of every Python function called while ``body`` runs, on this thread."""
    found: Counter[tuple[str, str]] = Counter()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            found[(frame.f_code.co_filename, frame.f_code.co_qualname)] += 1

    gc.disable()  # a collection would run finalizers (Python calls) at a random point
    sys.setprofile(profile)
    try:
        body()
    finally:
        sys.setprofile(None)
        gc.enable()
    return found


def _poolwatch_frames(calls: Counter[tuple[str, str]]) -> dict[tuple[str, str], int]:
    return {
        (Path(file).stem, function): count
        for (file, function), count in calls.items()
        if file.startswith(POOLWATCH)
    }


def _measure(cycle: Callable[[sa.Engine], Any]) -> tuple[Counter[tuple[str, str]], Counter[tuple[str, str]]]:
    """One warmed-up cycle on a plain engine and on a watched one."""
    measured = []
    for watched in (False, True):
        engine, _ = fake_engine()
        watch = poolwatch.watch(engine, registry=CollectorRegistry(), name="cost") if watched else None
        try:
            for _ in range(3):  # first connect, first route, caches: all before the measured cycle
                cycle(engine)
            measured.append(python_calls(lambda engine=engine: cycle(engine)))  # type: ignore[misc]
        finally:
            if watch is not None:
                watch.close()
            engine.dispose()
    return measured[0], measured[1]


def _check(
    plain: Counter[tuple[str, str]], watched: Counter[tuple[str, str]], pinned: dict[Any, int]
) -> None:
    ours = _poolwatch_frames(watched)
    assert ours == pinned, f"poolwatch's Python calls per cycle changed: {ours}"
    extra = sum(watched.values()) - sum(plain.values())
    assert extra == sum(pinned.values()), (
        f"poolwatch adds {extra} Python calls per cycle, {sum(pinned.values())} of them its own: "
        f"{sorted((watched - plain).items())}"
    )


def test_one_checkout_and_checkin_costs_two_python_calls() -> None:
    def checkout_checkin(engine: sa.Engine) -> None:
        engine.pool.connect().close()

    _check(*_measure(checkout_checkin), CHECKOUT_CHECKIN)


def test_connect_execute_close_costs_six_python_calls() -> None:
    def connect_execute_close(engine: sa.Engine) -> None:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")

    _check(*_measure(connect_execute_close), CONNECT_EXECUTE_CLOSE)
