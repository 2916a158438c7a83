"""The sizing verdict and the page's history on real pools (PostgreSQL), in real time.

The interval sampler's interval is a parameter: these tests run it at ``INTERVAL`` seconds, and
every window and hold is a number of intervals, so a scenario of "35 s on 1 s intervals" takes 7 s.
Nothing here bounds how long anything takes; the sampler's rows carry their own measured lengths.
"""

from __future__ import annotations

import contextlib
import gc
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

import poolwatch
from poolwatch._record import intervals as intervals_module
from poolwatch._record.intervals import PoolIntervals, sampler
from poolwatch._record.recorder import PoolRecorder
from poolwatch._serve.sizing import MIN_INTERVALS, MIN_INTERVALS_TOO_BIG
from poolwatch._serve.state import StateBuilder

INTERVAL = 0.2


@pytest.fixture
def short_intervals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sampler, "interval", INTERVAL)


def _pool_state(builder: StateBuilder, watch: poolwatch.PoolWatch) -> dict[str, Any]:
    recorders = list(zip(watch.pool_names, watch.recorders, strict=True))
    pool: dict[str, Any] = json.loads(builder.build(recorders, None))["pools"][0]
    return pool


def _kept(recorder: PoolRecorder) -> PoolIntervals:
    kept = sampler.of(recorder)
    assert kept is not None, "the pool is watched, so the sampler keeps its rows"
    return kept


def _each_interval(kept: PoolIntervals, count: int, between: Callable[[], None] = lambda: None) -> None:
    """Wait until the sampler has ended ``count`` more intervals, calling ``between`` after each."""
    target = kept.version + count
    deadline = time.monotonic() + 60 + count * INTERVAL * 20  # a hung sampler fails, never hangs
    seen = kept.version
    while kept.version < target:
        assert time.monotonic() < deadline, f"the sampler ended {kept.version - seen} of {count} intervals"
        time.sleep(INTERVAL / 4)
        if kept.version != seen:
            seen = kept.version
            between()


def _never_below_the_peak(pool: dict[str, Any]) -> None:
    suggested = pool["sizing"]["suggested_max"]
    if suggested is not None:
        assert suggested >= pool["window"]["peak_used"], pool["sizing"]
        assert suggested >= pool["kept"]["peak_used"], pool["sizing"]


def test_bursts_to_the_limit_shorter_than_an_interval_are_never_too_big(
    sync_url: str, registry: CollectorRegistry, short_intervals: None
) -> None:
    """10 of 10 in use for a moment every 2 intervals (on 1 s intervals: less than a second every
    2 s). Sampled gauges miss most bursts and saw a half-empty pool ("too big, shrink to 2-8");
    the exact peak is 10 in every window."""
    engine = sa.create_engine(sync_url, pool_size=10, max_overflow=0)
    stop = threading.Event()
    barrier = threading.Barrier(10)
    failures: list[BaseException] = []

    def burst() -> None:
        try:
            while not stop.is_set():
                barrier.wait()
                with engine.connect() as connection:
                    connection.exec_driver_sql("SELECT 1")
                    barrier.wait()  # all ten are out at once here
                time.sleep(INTERVAL * 2)
        except threading.BrokenBarrierError:
            pass
        except BaseException as error:
            failures.append(error)

    watch = poolwatch.watch(engine, registry=registry, name="bursty")
    builder = StateBuilder()
    kept = _kept(watch.recorders[0])
    verdicts: list[dict[str, Any]] = []

    def read() -> None:
        pool = _pool_state(builder, watch)
        verdicts.append(pool)
        assert pool["sizing"]["verdict"] != "too_big", pool["sizing"]
        _never_below_the_peak(pool)

    threads = [threading.Thread(target=burst) for _ in range(10)]
    for thread in threads:
        thread.start()
    try:
        _each_interval(kept, MIN_INTERVALS_TOO_BIG + 10, read)
    finally:
        stop.set()
        barrier.abort()
        for thread in threads:
            thread.join()
        watch.close()
        engine.dispose()
    assert not failures
    last = verdicts[-1]
    assert last["window"]["intervals"] >= MIN_INTERVALS_TOO_BIG
    assert last["window"]["peak_used"] == 10 and last["kept"]["peak_used"] == 10
    assert last["sizing"]["verdict"] in ("right", "too_small"), last["sizing"]
    # Most interval ends find the pool empty: only the exact per-interval peak shows the bursts.
    assert max(last["history"]["peak_used"]) == 10


def test_one_long_hold_on_a_pool_of_three_is_never_too_small(
    sync_url: str, registry: CollectorRegistry, short_intervals: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One checkout held 35 intervals, on a pool of 3, with a window of 20 intervals. Counting the
    whole hold when it comes back made "too small, 99 % of the limit, grow to 5" at peak 1 of 3;
    only the part of it inside the window counts: one connection in use, never more."""
    monkeypatch.setattr(intervals_module, "RECENT_ROWS", 20)
    engine = sa.create_engine(sync_url, pool_size=3, max_overflow=0)
    watch = poolwatch.watch(engine, registry=registry, name="held")
    builder = StateBuilder()
    kept = _kept(watch.recorders[0])
    seen: list[dict[str, Any]] = []

    def read() -> None:
        pool = _pool_state(builder, watch)
        seen.append(pool)
        assert pool["sizing"]["verdict"] != "too_small", pool["sizing"]
        assert pool["window"]["mean_in_use"] <= 1.0, pool["window"]
        _never_below_the_peak(pool)

    try:
        held = engine.connect()
        try:
            _each_interval(kept, 35, read)
        finally:
            held.close()
        read()  # at once after the return: the hold's 35 intervals came back in one checkin
        returned = seen[-1]
        _each_interval(kept, 3, read)
    finally:
        watch.close()
        engine.dispose()
    assert returned["window"]["peak_used"] == 1 and returned["window"]["intervals"] == 20
    # The window held the connection for all of its 20 intervals and a moment of the one under way.
    window = returned["window"]
    assert window["held_connection_seconds"] <= window["seconds"] + 0.05  # "seconds" has one decimal
    assert 0.9 <= window["mean_in_use"] <= 1.0
    assert returned["sizing"]["verdict"] == "right", returned["sizing"]
    assert any(pool["sizing"]["verdict"] == "unknown" for pool in seen[: MIN_INTERVALS - 1])


def test_the_verdict_is_unknown_until_the_window_is_long_enough(
    sync_url: str, registry: CollectorRegistry, short_intervals: None
) -> None:
    engine = sa.create_engine(sync_url, pool_size=2, max_overflow=0)
    watch = poolwatch.watch(engine, registry=registry, name="young")
    builder = StateBuilder()
    kept = _kept(watch.recorders[0])
    try:
        with engine.connect():
            first = _pool_state(builder, watch)
            _each_interval(kept, MIN_INTERVALS - 2)
            almost = _pool_state(builder, watch)
            _each_interval(kept, 3)
            enough = _pool_state(builder, watch)
    finally:
        watch.close()
        engine.dispose()
    for pool in (first, almost):
        assert pool["sizing"]["verdict"] == "unknown", pool["sizing"]
        assert "needs at least 2 s" in pool["sizing"]["reason"]
        assert pool["sizing"]["suggested_max"] is None
    assert enough["sizing"]["verdict"] == "right", enough["sizing"]


def test_a_window_without_any_checkout_is_unknown(
    sync_url: str, registry: CollectorRegistry, short_intervals: None
) -> None:
    engine = sa.create_engine(sync_url, pool_size=2, max_overflow=0)
    watch = poolwatch.watch(engine, registry=registry, name="idle")
    try:
        _each_interval(_kept(watch.recorders[0]), MIN_INTERVALS + 1)
        pool = _pool_state(StateBuilder(), watch)
    finally:
        watch.close()
        engine.dispose()
    assert pool["sizing"]["verdict"] == "unknown" and "no connection was taken" in pool["sizing"]["reason"]


# -- history from the start, whether or not the page is read -------------------------------------


@pytest.fixture
def engine(sync_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sync_url, pool_size=3, max_overflow=0)
    yield engine
    engine.dispose()


def test_history_is_kept_without_the_page_ever_being_read(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    """At the default interval (1 s), a real app: requests for 12 s, and nobody reads the page.
    Its first read shows those 12 s, their exact peak and a verdict; it used to open on "unknown,
    needs at least 10 s" with one sample."""
    app = FastAPI()
    inside = threading.Barrier(3)

    @app.get("/together")
    def together() -> dict[str, int]:
        # Three requests hold a connection each at the same moment, for a moment.
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
            with contextlib.suppress(threading.BrokenBarrierError):
                inside.wait(timeout=30)
        return {"ok": 1}

    poolwatch.instrument(app, engine, registry=registry, name="main", ui="always")
    with TestClient(app) as client:
        started = time.monotonic()
        while time.monotonic() - started < 12:
            threads = [threading.Thread(target=client.get, args=("/together",)) for _ in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            time.sleep(0.5)
        pool = client.get("/poolwatch/state").json()["pools"][0]
    assert len(pool["history"]["seconds_ago"]) >= 11
    assert pool["window"]["intervals"] >= MIN_INTERVALS
    assert pool["window"]["peak_used"] == 3 and max(pool["history"]["peak_used"]) == 3
    assert pool["sizing"]["verdict"] != "unknown", pool["sizing"]
    assert pool["kept"]["peak_used"] == 3
    assert len(pool["history_long"]["seconds_ago"]) == len(pool["history_long"]["peak_used"]) >= 1


def test_the_sampler_runs_from_the_first_watched_pool_to_the_last(
    engine: sa.Engine, registry: CollectorRegistry, short_intervals: None
) -> None:
    watch = poolwatch.watch(engine, registry=registry, name="main")
    recorder = watch.recorders[0]
    kept = _kept(recorder)
    _each_interval(kept, 2)
    watch.close()
    assert sampler.of(recorder) is None
    version = kept.version
    time.sleep(INTERVAL * 3)
    assert kept.version == version, "a released pool is not sampled any more"


def test_memory_per_pool_is_bounded(engine: sa.Engine, registry: CollectorRegistry) -> None:
    watch = poolwatch.watch(engine, registry=registry, name="main")
    try:
        kept = _kept(watch.recorders[0])
        row = kept.sample(watch.recorders[0])._replace(waits=tuple(range(19)))
        for _ in range(intervals_module.RECENT_ROWS * 3 + intervals_module.LONG_ROWS * 200):
            kept.add(row)
        assert len(kept.recent) == intervals_module.RECENT_ROWS
        assert len(kept.long) == intervals_module.LONG_ROWS
    finally:
        watch.close()


def test_rows_survive_collector_reentry(engine: sa.Engine, registry: CollectorRegistry) -> None:
    """A lost connection checked in by the garbage collector at every allocation of the sampler's
    reading: no count is lost and nothing waits forever (see tests/test_gc_reentry.py)."""
    from tests.test_gc_reentry import _assert_all_returned, _run_bounded, _sweep_allocation_points

    watch = poolwatch.watch(engine, registry=registry, name="gc")
    recorder = watch.recorders[0]
    kept = _kept(recorder)
    builder = StateBuilder()

    def sample_and_read() -> None:
        kept.sample(recorder)
        _pool_state(builder, watch)

    try:
        tried = _run_bounded(lambda: _sweep_allocation_points(engine, sample_and_read))
        assert tried >= 2
        _assert_all_returned(engine, registry, leaks=tried)
        gc.collect()
        # Every connection came back: nothing is out, and the rows' held time never went negative.
        assert all(row.held >= 0 for row in kept.recent)
        assert kept.sample(recorder).used == 0
    finally:
        watch.close()
