"""The live page's JSON for one pool, block by block and compared whole: ``now``, ``window``,
``kept``, ``sizing``, ``history``, ``history_long``, ``connections`` and the routes ranked by
connection time and by queries.

Every number is known: one clock stands in for ``perf_counter`` where checkouts are stamped and
where the page reads (and another for the wall clock), the pool's rows are the test's own (305 of
them, 2 s each: five long rows, five rows filling the sixth, and a recent ring of 300 that leaves the
five oldest rows out of the window but not out of what is kept), and the checkouts are taken by hand
at set times. The numbers carry more digits than the page shows. So a block that reads the wrong
row, rounds to the wrong digit or mixes the window up with what is kept gives a different JSON.
"""

from __future__ import annotations

import inspect
import json
import types
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import asyncpg  # type: ignore[import-untyped]
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import poolwatch
from poolwatch._capture import pool_hooks
from poolwatch._record import intervals as intervals_module
from poolwatch._record import recorder as recorder_module
from poolwatch._record.context import NO_REQUEST, RequestContext, current_request
from poolwatch._record.events import LeakDetected, shown_path
from poolwatch._record.intervals import LONG_ROW_INTERVALS, RECENT_ROWS, PoolIntervals, Row
from poolwatch._record.recorder import PoolRecorder
from poolwatch._record.requests import RequestStats
from poolwatch._serve import state as state_module
from poolwatch._serve.sizing import Window, advise
from poolwatch._serve.state import CONNECTION_FIELDS, StateBuilder, quantile

INTERVAL = 2.0
ROWS = RECENT_ROWS + 5
WALL = 1_800_000_000.25
THRESHOLD = 15.0
NOW = 1030.7654  # the read: 0.7654 s into the interval under way
BOUNDS = (0.001, 0.0123457)  # the wait histogram's bounds here: three buckets


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Sampler:
    """Stands in for the interval sampler: the rows it keeps are the test's own."""

    interval: float
    pools: dict[PoolRecorder, PoolIntervals]

    def of(self, recorder: PoolRecorder) -> PoolIntervals | None:
        return self.pools.get(recorder)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    for module in (pool_hooks, recorder_module, intervals_module, state_module):
        monkeypatch.setattr(module, "perf_counter", clock)
    monkeypatch.setattr(state_module, "time", types.SimpleNamespace(time=lambda: WALL))
    return clock


@pytest.fixture
def sampler(monkeypatch: pytest.MonkeyPatch) -> Sampler:
    sampler = Sampler(INTERVAL, {})
    monkeypatch.setattr(state_module, "sampler", sampler)
    return sampler


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
    of 5 and 2 callers queued; inside the window the peak is 3 and nobody queued, but for three
    waits every 50th row (two in the first bucket, one in the second)."""
    old = n < ROWS - RECENT_ROWS
    return Row(
        end=1030.0 - INTERVAL * (ROWS - 1 - n),
        seconds=INTERVAL,
        intervals=1,
        used=n % 7,
        idle=4 - n % 3,
        peak_used=5 if old else n % 4,
        peak_queued=2 if old else 0,
        checkouts=n % 7,
        timeouts=1 if n == 2 else 0,
        held=(n % 5) / 4,
        waits=(2, 1, 0) if n % 50 == 0 else (),
    )


def _request(route: str, method: str) -> RequestContext:
    request = RequestContext({"type": "http", "method": method})
    request.resolved_route = route
    return request


def _connect(engine: sa.Engine, request: RequestContext | None = None) -> tuple[sa.Connection, int]:
    """A connection taken in ``request`` (none: outside any), and the line that took it (the site
    its row names, in this function)."""
    token = current_request.set(request)
    try:
        frame = inspect.currentframe()
        assert frame is not None
        line = frame.f_lineno + 1
        connection = engine.connect()
    finally:
        current_request.reset(token)
    return connection, line


def _hold(engine: sa.Engine, clock: Clock, route: str, method: str, seconds: float) -> None:
    token = current_request.set(_request(route, method))
    try:
        with engine.connect():
            clock.now += seconds
    finally:
        current_request.reset(token)


def _pools(watch: Any) -> Any:
    return zip(watch.pool_names, watch.recorders, strict=True)


def _usage(recorder: PoolRecorder, connection: sa.Connection) -> list[float]:
    record = connection.connection._connection_record
    usage: list[float] = recorder.open_checkouts[record][7]
    return usage


def test_every_block_of_a_pool_is_exact(
    engine: sa.Engine, clock: Clock, sampler: Sampler, registry: CollectorRegistry
) -> None:
    watch = poolwatch.watch(engine, registry=registry, name="blocks", leak_threshold_seconds=THRESHOLD)
    (recorder,) = watch.recorders
    recorder.wait.bounds = BOUNDS
    recorder.wait.counts = [0, 0, 0]
    held: list[sa.Connection] = []
    try:
        # Holds per route: /a 3.0007 s; /b 0.5 s by GET and 0.3333333 s by POST; /c 1.25 s.
        for route, method, seconds in (
            ("/a", "GET", 3.0007),
            ("/b", "GET", 0.5),
            ("/c", "GET", 1.25),
            ("/b", "POST", 0.3333333),
        ):
            _hold(engine, clock, route, method, seconds)
        clock.now = 1010.0
        first, first_line = _connect(engine)
        held.append(first)
        # Three statements so far, 1.5 s inside them, 2.5 s idle inside a transaction.
        _usage(recorder, first)[:3] = [3, 1.5, 2.5]
        clock.now = 1020.0
        streaming = _request("/stream", "GET")
        second, second_line = _connect(engine, streaming)
        held.append(second)
        clock.now = 1025.0
        streaming.response_started, streaming.response_started_at = True, 1025.0
        clock.now = 1030.0
        intervals = sampler.pools[recorder] = PoolIntervals(recorder, INTERVAL)
        rows = [_row(n) for n in range(ROWS)]
        for row in rows:
            intervals.add(row)
        clock.now = NOW
        state = json.loads(StateBuilder().build(_pools(watch), None))
        records = [connection.connection._connection_record for connection in held]
    finally:
        for connection in held:
            connection.close()
        watch.close()

    (pool,) = state["pools"]
    b_seconds = 0.5 + 0.3333333
    assert state["routes_by_connection_time"] == [
        {"route": "/a", "connection_seconds": 3.001, "checkouts": 1, "mean_hold_seconds": 3.0007},
        {"route": "/c", "connection_seconds": 1.25, "checkouts": 1, "mean_hold_seconds": 1.25},
        {"route": "/b", "connection_seconds": 0.833, "checkouts": 2, "mean_hold_seconds": 0.416667},
    ]
    assert round(b_seconds / 2, 6) == 0.416667

    assert pool["now"] == {
        "used": 2,
        "idle": 0,
        "max": 5,
        "overflow": 0,
        "pending": 0,
        "oldest_checkout_seconds": 20.765,
        "leaked": 1,  # 20.77 s out against a threshold of 15; the other 10.77 s
    }

    # The window: the 300 recent rows and the 0.7654 s under way, with two checkouts out.
    recent = rows[-RECENT_ROWS:]
    under_way = NOW - 1030.0
    seconds = RECENT_ROWS * INTERVAL + under_way
    checkouts = sum(row.checkouts for row in recent)
    held_seconds = sum(row.held for row in recent) + 2 * under_way
    # 6 rows with waits: 12 in the first bucket, 6 in the second; rank 0.95 * 18 = 17.1 is 5.1 of
    # the second bucket's 6.
    wait_p95 = BOUNDS[0] + (BOUNDS[1] - BOUNDS[0]) * 5.1 / 6
    mean_used = sum(row.used for row in recent) / RECENT_ROWS
    assert pool["window"] == {
        "seconds": 600.8,
        "since_seconds_ago": 600.8,
        "interval_seconds": INTERVAL,
        "intervals": RECENT_ROWS,
        "checkouts": checkouts,
        "timeouts": 0,
        "wait_p95_seconds": 0.010644,
        "checkout_rate_per_second": round(checkouts / seconds, 3),
        "mean_hold_seconds": round(held_seconds / checkouts, 6),
        "mean_in_use": round(held_seconds / seconds, 3),
        "held_connection_seconds": round(held_seconds, 3),
        "mean_used_sampled": round(mean_used, 3),
        "peak_used": 3,
        "max_pending": 0,
    }
    assert round(wait_p95, 6) == 0.010644
    assert round(mean_used, 3) != round(mean_used, 4)  # the digits shown are the page's own

    # What is kept: every row (the five oldest too) and the interval under way.
    assert pool["kept"] == {"seconds": 610.8, "peak_used": 5, "max_pending": 2, "timeouts": 1}

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
        kept_seconds=ROWS * INTERVAL + under_way,
        kept_peak_used=5,
        kept_max_pending=2,
        kept_timeouts=1,
    )
    sizing = advise(5, window, 1)
    assert sizing.verdict == "right" and "1 connection(s) are held past the leak threshold" in sizing.reason
    assert pool["sizing"] == {"verdict": sizing.verdict, "reason": sizing.reason, "suggested_max": None}

    # The recent series: one point per recent row, then the interval under way (0 s ago).
    ages = [int(NOW - row.end + 0.5) for row in recent]
    assert ages[-1] == 1 and ages[0] == 599  # 0.77 s and 598.77 s ago, to the nearest second
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
    filling_held = sum(row.held for row in filling) + 2 * under_way
    filling_seconds = len(filling) * INTERVAL + under_way
    assert pool["history_long"] == {
        "row_seconds": LONG_ROW_INTERVALS * INTERVAL,
        "seconds_ago": [*(int(NOW - group[-1].end + 0.5) for group in long_rows), 0],
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
    function = "_connect"
    assert [dict(zip(CONNECTION_FIELDS, row, strict=True)) for row in pool["connections"]] == [
        {
            "age_ms": 20765,
            "method": NO_REQUEST,
            "route": NO_REQUEST,
            "site": f"{site}:{first_line}",
            "function": function,
            "statements": 3,
            "statement_ms": 1500,
            "leaked": True,
            "connection_age_ms": int((WALL - records[0].starttime) * 1000),
            "uses": 5,  # the connection the four holds used before
            "idle_in_transaction_ms": 2500,
            "after_response_ms": None,
        },
        {
            "age_ms": 10765,
            "method": "GET",
            "route": "/stream",
            "site": f"{site}:{second_line}",
            "function": function,
            "statements": 0,
            "statement_ms": 0,
            "leaked": False,
            "connection_age_ms": int((WALL - records[1].starttime) * 1000),
            "uses": 1,
            "idle_in_transaction_ms": 0,
            "after_response_ms": 5765,  # taken before its response started at 1025
        },
    ]


def test_the_edges_of_a_checkouts_row(
    engine: sa.Engine,
    clock: Clock,
    sampler: Sampler,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two checkouts taken at the same instant keep the order they were taken in; a checkout out
    exactly as long as the leak threshold is not leaked yet; one taken the instant its response
    started did not outlive the start; a response that started just now is 0 ms ago; and a wall
    clock set back behind a connection's birth gives it an age of 0, never a negative one."""
    monkeypatch.setattr(state_module, "time", types.SimpleNamespace(time=lambda: 1000.0))
    watch = poolwatch.watch(engine, registry=registry, name="edges", leak_threshold_seconds=10)
    clock.now = 100.0
    same_instant = _request("/same", "GET")
    later = _request("/later", "POST")
    first, _ = _connect(engine)
    second, _ = _connect(engine, same_instant)
    same_instant.response_started, same_instant.response_started_at = True, 100.0
    clock.now = 105.0
    third, _ = _connect(engine, later)
    clock.now = 110.0
    later.response_started, later.response_started_at = True, 110.0
    try:
        state = json.loads(StateBuilder().build(_pools(watch), None))
    finally:
        for connection in (first, second, third):
            connection.close()
        watch.close()
    (pool,) = state["pools"]
    assert pool["now"]["leaked"] == 0 and pool["now"]["oldest_checkout_seconds"] == 10.0
    rows = [dict(zip(CONNECTION_FIELDS, row, strict=True)) for row in pool["connections"]]
    assert [
        (row["age_ms"], row["route"], row["leaked"], row["connection_age_ms"], row["after_response_ms"])
        for row in rows
    ] == [
        (10000, NO_REQUEST, False, 0, None),
        (10000, "/same", False, 0, None),
        (5000, "/later", False, 0, 0),
    ]


def test_a_pool_nobody_samples_starts_its_own_rows_at_the_samplers_interval(
    engine: sa.Engine, clock: Clock, sampler: Sampler, registry: CollectorRegistry
) -> None:
    """A recorder the sampler does not know (its engine released from it) gets rows of its own,
    kept between reads: the window is the interval under way, of the sampler's length."""
    watch = poolwatch.watch(engine, registry=registry, name="unsampled")
    builder = StateBuilder()
    try:
        clock.now = 2000.0
        first = json.loads(builder.build(_pools(watch), None))
        clock.now = 2003.25
        second = json.loads(builder.build(_pools(watch), None))
    finally:
        watch.close()
    for state, seconds in ((first, 0.0), (second, 3.2)):  # 3.25 s since the first read's rows began
        (pool,) = state["pools"]
        window = pool["window"]
        assert (window["seconds"], window["interval_seconds"], window["intervals"]) == (seconds, INTERVAL, 0)
        assert pool["now"]["oldest_checkout_seconds"] == 0.0  # nothing out


def test_a_pool_whose_engine_is_gone_says_its_class_is_unknown(
    engine: sa.Engine, sampler: Sampler, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that meets a recorder whose engine was collected (the source holds it weakly)."""

    class Collected:
        pass

    collected = Collected()
    dead = weakref.ref(collected)
    del collected
    watch = poolwatch.watch(engine, registry=registry, name="gone")
    try:
        (recorder,) = watch.recorders
        monkeypatch.setattr(recorder.source, "_engine_ref", dead)
        assert recorder.pool is None
        (pool,) = json.loads(StateBuilder().build(_pools(watch), None))["pools"]
    finally:
        watch.close()
    assert (pool["pool_class"], pool["now"]["max"], pool["connections_out"]) == ("unknown", None, 0)


def test_a_cached_checkout_row_is_used_only_for_the_very_checkout_it_was_made_for(
    engine: sa.Engine, clock: Clock, sampler: Sampler, registry: CollectorRegistry
) -> None:
    watch = poolwatch.watch(engine, registry=registry, name="rows")
    (recorder,) = watch.recorders
    connection, _ = _connect(engine, _request("/now", "GET"))
    builder = StateBuilder()
    try:
        (entry,) = list(recorder.open_checkouts.values())
        gone = (entry[0], _request("/gone", "GET"), *entry[2:])
        builder._rows[recorder] = {id(entry): (gone, '"GET","/gone","old.py:1","old"')}
        (pool,) = json.loads(builder.build(_pools(watch), None))["pools"]
    finally:
        connection.close()
        watch.close()
    (row,) = pool["connections"]
    assert row[CONNECTION_FIELDS.index("route")] == "/now"


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
    engine: sa.Engine,
    clock: Clock,
    sampler: Sampler,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(state_module, "time", types.SimpleNamespace(time=lambda: 1_800_000_000.123456))
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


async def test_a_driver_pools_row_has_no_connection_age_or_uses_to_tell(
    postgres_url: str, registry: CollectorRegistry
) -> None:
    """asyncpg's connection holders carry neither SQLAlchemy's opening stamp nor a use count: null,
    never a made-up number or a failed read."""
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
    watch = poolwatch.watch(pool, registry=registry, name="apg")
    try:
        async with pool.acquire():
            (state,) = json.loads(StateBuilder().build(_pools(watch), None))["pools"]
    finally:
        watch.close()
        await pool.close()
    (row,) = state["connections"]
    named = dict(zip(CONNECTION_FIELDS, row, strict=True))
    assert (named["connection_age_ms"], named["uses"], named["idle_in_transaction_ms"]) == (None, None, 0)


def test_a_shared_records_row_whose_proxy_is_already_collected_says_null(
    sampler: Sampler, registry: CollectorRegistry
) -> None:
    """StaticPool's rows reach the record through the checkout's proxy, held weakly: a read that
    meets the entry just as the proxy is collected has no record to read."""

    class Collected:
        pass

    collected = Collected()
    dead = weakref.ref(collected)
    del collected
    engine = sa.create_engine("sqlite://", poolclass=sa.pool.StaticPool)
    watch = poolwatch.watch(engine, registry=registry, name="static")
    (recorder,) = watch.recorders
    try:
        with engine.connect():
            ((key, entry),) = list(recorder.open_checkouts.items())
            cast(dict[Any, Any], recorder.open_checkouts)[key] = (*entry[:2], dead, *entry[3:])
            (pool,) = json.loads(StateBuilder().build(_pools(watch), None))["pools"]
            recorder.open_checkouts[key] = entry
    finally:
        watch.close()
        engine.dispose()
    (row,) = pool["connections"]
    named = dict(zip(CONNECTION_FIELDS, row, strict=True))
    assert (named["connection_age_ms"], named["uses"]) == (None, None)
