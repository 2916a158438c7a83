"""The garbage collector may check a lost connection in on any thread, at any allocation (3.11) or
between bytecodes (3.12+), even while that thread is inside poolwatch holding a pool's lock.

Each reading path is run again and again with a leaked connection in a reference cycle and the
collector's threshold set so that a collection starts at the 1st, 2nd, 3rd ... allocation of the
path, until the path finishes before its collection: every allocation point is tried once. A path
that waits on a lock its own thread holds never returns, so each sweep runs in a thread with a
generous bound; afterwards every checkout must have been checked in exactly once.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

import poolwatch
from poolwatch._capture.pool_hooks import recorder_of
from poolwatch._log import internal_errors
from poolwatch._record.context import RequestContext, current_request
from poolwatch._record.leaks import sweeper
from poolwatch._record.recorder import PoolRecorder
from poolwatch._serve.exposition import render
from poolwatch._serve.probe import read_state
from poolwatch._serve.state import StateBuilder
from tests.metrics import scrape

# A deadlocked sweep never finishes; a healthy one takes seconds. Far apart on any machine.
BOUND_SECONDS = 120
# No path here allocates anywhere near this much; the sweep stops when the path outruns it.
MAX_ALLOCATION_POINTS = 20_000


# Far more than the allocations before a reading path's copies of the per-route counts.
FIRST_POINTS = 300


def _sweep_allocation_points(
    engine: sa.Engine,
    path: Callable[[], object],
    checkout: Callable[[], object] | None = None,
    first_points: int | None = None,
) -> int:
    """Run ``path`` again and again, losing a checked-out connection at its 1st, 2nd, 3rd ...
    garbage collection, until the path finishes before that collection; return how many ran.

    With the youngest generation's threshold at 1 a collection starts at nearly every allocation.
    A connection checked out beforehand is kept by one reference; the collection chosen for this
    round (its "start" callback) drops that reference into a fresh reference cycle, which that
    same collection frees, so SQLAlchemy checks the connection in right there, inside the path.

    ``checkout`` takes the connection to lose (default ``engine.connect``); with ``first_points``
    only that many points are tried, for a path that grows with each round.
    """
    old_threshold = gc.get_threshold()
    gc.collect()
    point = 0
    try:
        while point < MAX_ALLOCATION_POINTS:
            if point == first_points:
                return point
            point += 1
            holder: list[object] = [engine.connect() if checkout is None else checkout()]
            collections = [0]

            def lose_it_at_this_collection(
                phase: str,
                info: dict[str, int],
                holder: list[object] = holder,
                point: int = point,
                collections: list[int] = collections,
            ) -> None:
                if phase != "start" or not holder:
                    return
                collections[0] += 1
                if collections[0] == point:
                    cycle: list[object] = [holder.pop()]
                    cycle.append(cycle)

            gc.callbacks.append(lose_it_at_this_collection)
            # Older generations never: a full collection per round would take minutes.
            gc.set_threshold(1, 1_000_000, 1_000_000)
            try:
                path()
            finally:
                gc.set_threshold(*old_threshold)
                gc.callbacks.remove(lose_it_at_this_collection)
            if holder:
                holder.clear()  # the path ended first: every collection point has been tried
                return point
    finally:
        gc.set_threshold(*old_threshold)
    raise AssertionError(f"the path allocated more than {MAX_ALLOCATION_POINTS} times")


def poolwatch_recorder(engine: sa.Engine) -> PoolRecorder:
    recorder = recorder_of(engine.pool)
    assert recorder is not None
    return recorder


def _run_bounded(body: Callable[[], int]) -> int:
    result: list[int] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            result.append(body())
        except BaseException as error:
            failure.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(BOUND_SECONDS)
    assert not thread.is_alive(), "a path deadlocked under garbage-collector re-entry"
    if failure:
        raise failure[0]
    print(f"allocation points tried: {result[0]}")
    return result[0]


@pytest.fixture
def engine(sync_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sync_url, pool_size=3, max_overflow=2)
    yield engine
    engine.dispose()


def _assert_all_returned(engine: sa.Engine, registry: CollectorRegistry, leaks: int) -> None:
    gc.collect()
    recorder = poolwatch_recorder(engine)
    assert recorder.checkouts == recorder.checkins
    assert sum(recorder.gc_reclaimed.values()) == leaks
    samples = scrape(registry)
    name = recorder.name
    assert samples.value("poolwatch_connections", pool=name, state="used") == 0
    assert samples.value("poolwatch_checkouts_total", pool=name) == samples.value(
        "poolwatch_checkins_total", pool=name
    )


@pytest.mark.parametrize(
    "path_name",
    [
        "registry_collect",
        "direct_render",
        "live_checkouts",
        "health_state",
        "checkout_checkin",
        "live_page_state",
    ],
)
def test_reading_paths_survive_collector_reentry(
    engine: sa.Engine, registry: CollectorRegistry, path_name: str
) -> None:
    watch = poolwatch.watch(engine, registry=registry, name="gc")
    recorder = watch.recorders[0]
    errors_before = _internal_errors()

    def checkout_checkin() -> None:
        with engine.connect():
            pass

    # The live page's JSON: copies the checkout table and the recent events (each reclaimed
    # connection adds one while the copy runs).
    page_state = StateBuilder()

    paths: dict[str, Callable[[], object]] = {
        "registry_collect": lambda: list(registry.collect()),
        "direct_render": lambda: render(
            registry, "application/openmetrics-text", "gzip", watch.direct_collector
        ),
        "live_checkouts": recorder.live_checkouts,
        "health_state": lambda: read_state(recorder),
        "checkout_checkin": checkout_checkin,
        "live_page_state": lambda: page_state.build([("gc", recorder)], watch.requests),
    }
    tried = _run_bounded(lambda: _sweep_allocation_points(engine, paths[path_name]))
    assert tried >= 2, "the path allocated nothing: the sweep proved nothing"
    _assert_all_returned(engine, registry, leaks=tried)
    assert _internal_errors() == errors_before


@pytest.mark.parametrize("path_name", ["registry_collect", "direct_render"])
def test_a_reentry_that_adds_a_route_keeps_every_count_with_its_route(
    engine: sa.Engine, registry: CollectorRegistry, path_name: str
) -> None:
    """Each lost connection was taken under a route never seen before, so the nested checkin adds
    a key to the per-route counts while the reader copies them: keys and counts must still pair.

    Every route makes the path longer, so only its first points are tried: the copies of the
    per-route counts come early in it, and a hundred rounds reach well past them."""
    watch = poolwatch.watch(engine, registry=registry, name="gc")
    errors_before = _internal_errors()
    routes = itertools.count()

    def checkout_under_a_new_route() -> object:
        request = RequestContext({"type": "http", "route": None})
        request.resolved_route = f"/new/{next(routes)}"
        token = current_request.set(request)
        try:
            return engine.connect()
        finally:
            current_request.reset(token)

    paths: dict[str, Callable[[], object]] = {
        "registry_collect": lambda: list(registry.collect()),
        "direct_render": lambda: render(registry, None, None, watch.direct_collector),
    }
    tried = _run_bounded(
        lambda: _sweep_allocation_points(
            engine, paths[path_name], checkout_under_a_new_route, first_points=FIRST_POINTS
        )
    )
    assert tried == FIRST_POINTS
    _assert_all_returned(engine, registry, leaks=tried)
    assert _internal_errors() == errors_before
    samples = scrape(registry)
    reclaimed = {
        labels["route"]: count for labels, count in samples.find("poolwatch_gc_reclaimed_total", pool="gc")
    }
    assert reclaimed == {"<none>": 0, **{f"/new/{n}": 1 for n in range(tried)}}
    held = {
        labels["route"]: count for labels, count in samples.find("poolwatch_use_seconds_count", pool="gc")
    }
    assert held == {"<none>": 0, **{f"/new/{n}": 1 for n in range(tried)}}


def test_leak_sweep_survives_collector_reentry(engine: sa.Engine, registry: CollectorRegistry) -> None:
    # A threshold of a microsecond: every checkout out during a sweep is flagged by it.
    watch = poolwatch.watch(engine, registry=registry, name="gc", leak_threshold_seconds=0.000001)
    errors_before = _internal_errors()
    held = engine.connect()  # something for every sweep to find besides the leak
    try:
        tried = _run_bounded(lambda: _sweep_allocation_points(engine, sweeper.sweep_now))
    finally:
        held.close()
    assert tried >= 2
    _assert_all_returned(engine, registry, leaks=tried)
    recorder = watch.recorders[0]
    # Every checkout held past the threshold is counted exactly once: the held one, each leak,
    # and each sweep-free checkout the test made is at most one more; none twice.
    assert sum(recorder.leaks.values()) <= recorder.checkouts
    assert sum(recorder.leaks.values()) >= tried + 1
    assert not recorder.leaked_records, "a flagged checkout was never settled"
    assert _internal_errors() == errors_before


def test_multiworker_publish_survives_collector_reentry(
    engine: sa.Engine, registry: CollectorRegistry, tmp_path: Path
) -> None:
    watch = poolwatch.watch(engine, registry=registry, name="gc", multiproc_dir=tmp_path)
    publisher = watch._shared.publisher
    assert publisher is not None
    errors_before = _internal_errors()
    tried = _run_bounded(lambda: _sweep_allocation_points(engine, publisher.publish))
    assert tried >= 2
    _assert_all_returned(engine, registry, leaks=tried)
    assert _internal_errors() == errors_before
    watch.close()


def test_health_endpoint_survives_collector_reentry(engine: sa.Engine, registry: CollectorRegistry) -> None:
    app = FastAPI()
    poolwatch.instrument(app, engine, registry=registry, name="gc", health_cache_seconds=0)
    errors_before = _internal_errors()

    async def ask() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            response = await client.get("/health/db")
            assert response.status_code == 200, response.text

    tried = _run_bounded(lambda: _sweep_allocation_points(engine, lambda: asyncio.run(ask())))
    assert tried >= 2
    _assert_all_returned(engine, registry, leaks=tried)
    assert _internal_errors() == errors_before


def _internal_errors() -> int:
    return internal_errors.count
