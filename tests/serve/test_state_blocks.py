"""The live page's JSON for one pool, block by block and compared whole: ``now``, ``window``,
``kept``, ``sizing``, ``history``, ``history_long``, ``connections`` and the routes ranked by
connection time.

Every number is known: one clock stands in for ``perf_counter`` where checkouts are stamped and
where the page reads (and another for the wall clock), the pool's rows are the test's own (305 of
them, 2 s each: five long rows, five rows filling the sixth, and a recent ring of 300 that leaves the
five oldest rows out of the window but not out of what is kept), and the checkouts are taken by hand
at set times. So a block that reads the wrong row, rounds to the wrong digit or mixes the window up
with what is kept gives a different JSON.
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import poolwatch
from poolwatch._capture import pool_hooks
from poolwatch._record import intervals as intervals_module
from poolwatch._record import recorder as recorder_module
from poolwatch._record.context import NO_REQUEST, RequestContext, current_request
from poolwatch._record.events import LeakDetected, shown_path
from poolwatch._record.intervals import LONG_ROW_INTERVALS, RECENT_ROWS, PoolIntervals, Row, sampler
from poolwatch._record.requests import RequestStats
from poolwatch._serve import state as state_module
from poolwatch._serve.sizing import Window, advise
from poolwatch._serve.state import CONNECTION_FIELDS, StateBuilder, quantile

INTERVAL = 2.0
ROWS = RECENT_ROWS + 5
WALL = 1_800_000_000.25
THRESHOLD = 15.0


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    for module in (pool_hooks, recorder_module, intervals_module, state_module):
        monkeypatch.setattr(module, "perf_counter", clock)
    monkeypatch.setattr(state_module, "time", types.SimpleNamespace(time=lambda: WALL))
    return clock


@pytest.fixture
def engine(sync_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sync_url, pool_size=3, max_overflow=2)
    with engine.connect():  # the dialect's first-connect statements, before anything is watched
        pass
    engine.dispose()
    yield engine
    engine.dispose()


def _row(n: int) -> Row:
    """Row n of ROWS, ending at 1030 - 2 * (ROWS - 1 - n): the last one where the pool's intervals
    begin. The five oldest (outside the recent ring) hold the history's extremes: a timeout, a peak
    of 5 and 2 callers queued; inside the window the peak is 3 and nobody queued, but for a wait in
    the second bucket every 50th row."""
    old = n < ROWS - RECENT_ROWS
    return Row(
        end=1030.0 - INTERVAL * (ROWS - 1 - n),
        seconds=INTERVAL,
        intervals=1,
        used=n % 3,
        idle=4 - n % 3,
        peak_used=5 if old else n % 4,
        peak_queued=2 if old else 0,
        checkouts=n % 7,
        timeouts=1 if n == 2 else 0,
        held=(n % 5) / 4,
        waits=(0, 3, 0) if n % 50 == 0 else (),
    )


def _with_request(route: str, method: str) -> Any:
    request = RequestContext({"type": "http", "method": method})
    request.resolved_route = route
    return current_request.set(request)


def _hold(engine: sa.Engine, clock: Clock, route: str, method: str, seconds: float) -> None:
    token = _with_request(route, method)
    try:
        with engine.connect():
            clock.now += seconds
    finally:
        current_request.reset(token)


def test_every_block_of_a_pool_is_exact(engine: sa.Engine, clock: Clock, registry: CollectorRegistry) -> None:
    watch = poolwatch.watch(engine, registry=registry, name="blocks", leak_threshold_seconds=THRESHOLD)
    (recorder,) = watch.recorders
    sampler.discard(recorder)  # the rows are the test's own: no sampler thread adds any
    recorder.wait.bounds = (0.01, 0.1)  # three buckets, as the rows' waits have
    recorder.wait.counts = [0, 0, 0]
    held: list[Any] = []
    try:
        # Holds per route, in seconds exact in binary: /a 3 s; /b 0.5 s by GET and 0.5 s by POST;
        # /c 1.25 s.
        for route, method, seconds in (
            ("/a", "GET", 3.0),
            ("/b", "GET", 0.5),
            ("/c", "GET", 1.25),
            ("/b", "POST", 0.5),
        ):
            _hold(engine, clock, route, method, seconds)
        clock.now = 1010.0
        held.append(engine.connect())
        first_line = _lineno() - 1
        clock.now = 1020.0
        held.append(engine.connect())
        second_line = _lineno() - 1
        clock.now = 1030.0
        intervals = PoolIntervals(recorder, INTERVAL)
        rows = [_row(n) for n in range(ROWS)]
        for row in rows:
            intervals.add(row)
        builder = StateBuilder()
        builder._unsampled[recorder] = intervals
        clock.now = 1030.7
        state = json.loads(builder.build(zip(watch.pool_names, watch.recorders, strict=True), None))
        records = [connection.connection._connection_record for connection in held]
    finally:
        for connection in held:
            connection.close()
        watch.close()

    (pool,) = state["pools"]
    assert state["routes_by_connection_time"] == [
        {"route": "/a", "connection_seconds": 3.0, "checkouts": 1, "mean_hold_seconds": 3.0},
        {"route": "/c", "connection_seconds": 1.25, "checkouts": 1, "mean_hold_seconds": 1.25},
        {"route": "/b", "connection_seconds": 1.0, "checkouts": 2, "mean_hold_seconds": 0.5},
    ]

    assert pool["now"] == {
        "used": 2,
        "idle": 0,
        "max": 5,
        "overflow": 0,
        "pending": 0,
        "oldest_checkout_seconds": 20.7,
        "leaked": 1,  # 20.7 s out against a threshold of 15; the other 10.7 s
    }

    # The window: the 300 recent rows and the 0.7 s under way (two checkouts out: 1.4 held).
    recent = rows[-RECENT_ROWS:]
    seconds = RECENT_ROWS * INTERVAL + 0.7
    checkouts = sum(row.checkouts for row in recent)
    held_seconds = sum(row.held for row in recent) + 1.4
    # 6 rows with 3 waits each in the second bucket (0.01-0.1 s): rank 0.95 * 18 = 17.1 of 18.
    wait_p95 = 0.01 + 0.09 * 17.1 / 18
    mean_used = sum(row.used for row in recent) / RECENT_ROWS
    assert pool["window"] == {
        "seconds": round(seconds, 1),
        "since_seconds_ago": round(seconds, 1),
        "interval_seconds": INTERVAL,
        "intervals": RECENT_ROWS,
        "checkouts": checkouts,
        "timeouts": 0,
        "wait_p95_seconds": round(wait_p95, 6),
        "checkout_rate_per_second": round(checkouts / seconds, 3),
        "mean_hold_seconds": round(held_seconds / checkouts, 6),
        "mean_in_use": round(held_seconds / seconds, 3),
        "held_connection_seconds": round(held_seconds, 3),
        "mean_used_sampled": round(mean_used, 3),
        "peak_used": 3,
        "max_pending": 0,
    }
    assert (round(seconds, 1), round(wait_p95, 6)) == (600.7, 0.0955)

    # What is kept: every row (the five oldest too) and the interval under way.
    assert pool["kept"] == {
        "seconds": round(ROWS * INTERVAL + 0.7, 1),
        "peak_used": 5,
        "max_pending": 2,
        "timeouts": 1,
    }

    window = Window(
        seconds=seconds,
        intervals=RECENT_ROWS,
        interval_seconds=INTERVAL,
        checkouts=checkouts,
        timeouts=0,
        wait_p95=wait_p95,
        held_seconds=held_seconds,
        peak_used=3,
        max_pending=0,
        mean_used=mean_used,
        kept_seconds=ROWS * INTERVAL + 0.7,
        kept_peak_used=5,
        kept_max_pending=2,
        kept_timeouts=1,
    )
    sizing = advise(5, window, 1)
    assert sizing.verdict == "right" and "1 connection(s) are held past the leak threshold" in sizing.reason
    assert pool["sizing"] == {"verdict": sizing.verdict, "reason": sizing.reason, "suggested_max": None}

    # The recent series: one point per recent row, then the interval under way (0 s ago).
    ages = [int(1030.7 - row.end + 0.5) for row in recent]
    assert ages[-1] == 1 and ages[0] == 599  # 0.7 s and 598.7 s ago, to the nearest second
    assert pool["history"] == {
        "seconds_ago": [*ages, 0],
        "used": [*(row.used for row in recent), 2],
        "idle": [*(row.idle for row in recent), 0],
        "pending": [*(row.peak_queued for row in recent), 0],
        "peak_used": [*(row.peak_used for row in recent), 2],
    }

    # The long series: five long rows of 60, then the five rows filling the sixth with the
    # interval under way.
    long_rows = [rows[start : start + LONG_ROW_INTERVALS] for start in range(0, 300, LONG_ROW_INTERVALS)]
    filling = rows[300:]
    filling_held = sum(row.held for row in filling) + 1.4
    filling_seconds = len(filling) * INTERVAL + 0.7
    assert pool["history_long"] == {
        "row_seconds": LONG_ROW_INTERVALS * INTERVAL,
        "seconds_ago": [*(int(1030.7 - group[-1].end + 0.5) for group in long_rows), 0],
        "peak_used": [*(max(row.peak_used for row in group) for group in long_rows), 3],
        "peak_pending": [*(max(row.peak_queued for row in group) for group in long_rows), 0],
        "mean_in_use": [
            *(
                round(sum(row.held for row in group) / (LONG_ROW_INTERVALS * INTERVAL), 2)
                for group in long_rows
            ),
            round(filling_held / filling_seconds, 2),
        ],
    }
    assert pool["history_long"]["seconds_ago"][:2] == [491, 371]
    assert pool["history_long"]["peak_used"][0] == 5  # the oldest rows' peak, out of the window

    # The connections out, oldest first: every column.
    assert pool["connections_out"] == 2
    assert pool["connection_fields"] == list(CONNECTION_FIELDS)
    site = shown_path(__file__)
    rows_out = [dict(zip(CONNECTION_FIELDS, row, strict=True)) for row in pool["connections"]]
    assert rows_out == [
        {
            "age_ms": age_ms,
            "method": NO_REQUEST,
            "route": NO_REQUEST,
            "site": f"{site}:{line}",
            "function": "test_every_block_of_a_pool_is_exact",
            "statements": 0,
            "statement_ms": 0,
            "leaked": leaked,
            "connection_age_ms": int((WALL - record.starttime) * 1000),
            "uses": uses,
            "idle_in_transaction_ms": 0,
            "after_response_ms": None,
        }
        for age_ms, line, leaked, record, uses in (
            (20700, first_line, True, records[0], 5),
            (10700, second_line, False, records[1], 1),
        )
    ]


def _lineno() -> int:
    import inspect

    frame = inspect.currentframe()
    assert frame is not None and frame.f_back is not None
    return frame.f_back.f_lineno


def test_routes_by_queries_are_exact_and_ranked_by_queries_per_request(
    engine: sa.Engine, registry: CollectorRegistry
) -> None:
    """Three routes' statements per request: the mean to two places, the p95 as a count some request
    really ran, the method, the busiest first."""
    watch = poolwatch.watch(engine, registry=registry, name="queries")
    stats = RequestStats()
    for labels, counts in (
        (("/a", "GET"), (1, 2, 4)),  # a mean of 7 / 3
        (("/c", "DELETE"), (1,)),
        (("/b", "POST"), (5, 5)),
    ):
        for count in counts:
            stats.request_finished(labels, count)
    try:
        state = json.loads(StateBuilder().build(zip(watch.pool_names, watch.recorders, strict=True), stats))
    finally:
        watch.close()
    assert state["routes_by_queries"] == [
        {"route": "/b", "method": "POST", "requests": 2, "queries_per_request": 5.0, "queries_p95": 5},
        {"route": "/a", "method": "GET", "requests": 3, "queries_per_request": 2.33, "queries_p95": 4},
        {"route": "/c", "method": "DELETE", "requests": 1, "queries_per_request": 1.0, "queries_p95": 1},
    ]


def test_the_head_says_when_and_over_what_window(
    engine: sa.Engine, clock: Clock, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_module, "time", types.SimpleNamespace(time=lambda: 1_800_000_000.123456))
    monkeypatch.setattr(sampler, "interval", INTERVAL)
    watch = poolwatch.watch(engine, registry=registry, name="head")
    try:
        state = json.loads(StateBuilder().build(zip(watch.pool_names, watch.recorders, strict=True), None))
    finally:
        watch.close()
    assert (state["format"], state["generated_at"], state["window_seconds"]) == (1, 1_800_000_000.123, 600.0)


def test_a_cached_row_is_used_only_for_the_very_event_and_code_it_was_made_for() -> None:
    """The builder's caches are keyed by ``id()``, which Python reuses once an object is gone: an
    entry left from another object under the same id is never served."""
    builder = StateBuilder()
    event = (1000.0, LeakDetected("cache", "/now", 31.0, 30.0, "app.py:3", "handler"))
    gone = (999.0, LeakDetected("cache", "/gone", 1.0, 30.0, "old.py:1", "old"))
    builder._event_rows[id(event)] = (gone, '{"stale":true}')
    (row,) = builder._events([event], {"cache"})
    assert json.loads(row)["route"] == "/now"

    code = test_a_cached_row_is_used_only_for_the_very_event_and_code_it_was_made_for.__code__
    other = test_routes_by_queries_are_exact_and_ranked_by_queries_per_request.__code__
    sites = state_module._sites
    sites[(id(code), 0)] = (other, '"stale.py:1","stale"')
    try:
        fragment = state_module._site_fragment((code, 0))
    finally:
        sites.pop((id(code), 0), None)
    assert fragment.endswith('"test_a_cached_row_is_used_only_for_the_very_event_and_code_it_was_made_for"')


def test_the_site_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    sites: dict[tuple[int, int], tuple[Any, str]] = {
        (n, 0): (None, "") for n in range(state_module._MAX_SITES)
    }
    monkeypatch.setattr(state_module, "_sites", sites)
    state_module._site_fragment((test_the_site_cache_is_bounded.__code__, 0))
    assert len(sites) == 1  # full: emptied before the new entry


def test_a_quantile_that_ends_exactly_on_a_bucket_is_its_bound_like_prometheus() -> None:
    # Rank 1 of 2 is the first bucket's whole: its upper bound, not the next non-empty bucket's.
    assert quantile(0.5, (1.0, 2.0, 3.0), [1, 0, 1, 0]) == 1.0
