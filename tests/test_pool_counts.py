"""What the pool gauges mean, against the situations that would fool them: callers pre-pinging or
opening a connection are not "pending", the exact peak survives a burst shorter than any sample, a
pool that shares one record among checkouts (StaticPool) still has every checkout tracked, no age
is ever negative, and a pool timeout explains itself. Real PostgreSQL, through the fault proxy
where the wire must hang."""

from __future__ import annotations

import gc
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import StaticPool

import poolwatch
from poolwatch._record.events import shown_path
from poolwatch._record.recorder import PoolRecorder
from tests.fault_fixtures import proxied, proxy, wait_until
from tests.metrics import value
from tests.proxy import FaultProxy

__all__ = ["proxy"]  # the fixture, imported for pytest


def recorder_of(watch: poolwatch.PoolWatch) -> PoolRecorder:
    [recorder] = watch.recorders
    return recorder


def gauges(registry: CollectorRegistry) -> tuple[float, float, float, float]:
    return (
        value(registry, "poolwatch_connections", pool="p", state="used"),
        value(registry, "poolwatch_pending_requests", pool="p"),
        value(registry, "poolwatch_connections_pinging", pool="p"),
        value(registry, "poolwatch_connections_opening", pool="p"),
    )


@pytest.fixture
def watched(registry: CollectorRegistry) -> Iterator[list[poolwatch.PoolWatch]]:
    made: list[poolwatch.PoolWatch] = []
    yield made
    for watch in made:
        watch.close()


def test_callers_pre_pinging_are_not_pending(
    postgres_url: str, proxy: FaultProxy, registry: CollectorRegistry, watched: list[poolwatch.PoolWatch]
) -> None:
    """A pool of 10 with pre-ping and six callers is never full: nobody is queued while their
    pre-pings hang on the wire. The old count said 6 pending."""
    engine = sa.create_engine(
        proxied(postgres_url, proxy, "psycopg"), pool_size=10, max_overflow=0, pool_pre_ping=True
    )
    watched.append(poolwatch.watch({"p": engine}, registry=registry))
    # Six connections opened, and back in the pool.
    held = [engine.connect() for _ in range(6)]
    for connection in held:
        connection.close()
    proxy.set_mode("stall")
    with ThreadPoolExecutor(6) as callers:
        futures = [callers.submit(lambda: engine.connect().close()) for _ in range(6)]
        try:
            wait_until(
                lambda: gauges(registry)[2] == 6, 10, f"the pre-pings never showed: {gauges(registry)}"
            )
            seen = gauges(registry)
        finally:
            proxy.set_mode("pass")
        for future in futures:
            future.result()
    assert seen == (0, 0, 6, 0)  # used, pending, pinging, opening
    assert gauges(registry) == (0, 0, 0, 0)
    engine.dispose()


def test_callers_opening_a_connection_are_not_pending_and_queued_ones_are(
    postgres_url: str, proxy: FaultProxy, registry: CollectorRegistry, watched: list[poolwatch.PoolWatch]
) -> None:
    # Connections attempted while the link stalls never complete: they give up after 2 s.
    engine = sa.create_engine(
        proxied(postgres_url, proxy, "psycopg"),
        pool_size=2, max_overflow=1, pool_timeout=30, connect_args={"connect_timeout": 2},
    )  # fmt: skip
    watched.append(poolwatch.watch({"p": engine}, registry=registry))
    proxy.set_mode("stall")
    with ThreadPoolExecutor(5) as callers:
        futures = [callers.submit(lambda: engine.connect().close()) for _ in range(5)]
        try:
            # Three take a slot and hang opening a connection; two queue for a slot.
            wait_until(
                lambda: gauges(registry)[1:] == (2, 0, 3),
                10,
                f"never 3 opening, 2 queued: {gauges(registry)}",
            )
            seen = gauges(registry)
        finally:
            proxy.set_mode("pass")
        outcomes = [future.exception() for future in futures]
    assert seen == (0, 2, 0, 3)
    # The three openings gave up; the two queued callers then got slots and connected.
    assert (
        sorted(type(outcome).__name__ for outcome in outcomes) == ["NoneType"] * 2 + ["OperationalError"] * 3
    )
    assert gauges(registry) == (0, 0, 0, 0)
    engine.dispose()


def test_the_exact_peak_survives_a_burst_shorter_than_any_sample(
    sync_url: str, registry: CollectorRegistry, watched: list[poolwatch.PoolWatch]
) -> None:
    engine = sa.create_engine(sync_url, pool_size=3, max_overflow=0, pool_timeout=30)
    watch = poolwatch.watch({"p": engine}, registry=registry)
    watched.append(watch)
    recorder = recorder_of(watch)
    assert recorder.take_peaks() == (0, 0)
    # Three out and two queued for an instant, then everything back before anyone looks.
    out = [engine.connect() for _ in range(3)]
    with ThreadPoolExecutor(2) as callers:
        futures = [callers.submit(lambda: engine.connect().close()) for _ in range(2)]
        wait_until(lambda: recorder.queued == 2, 10, "two never queued")
        for connection in out:
            connection.close()
        for future in futures:
            future.result()
    assert (recorder.in_use, recorder.queued) == (0, 0)
    assert recorder.take_peaks() == (3, 2)
    # The next interval starts from what is out now.
    held = engine.connect()
    assert recorder.take_peaks() == (1, 0)
    assert recorder.take_peaks() == (1, 0)
    held.close()
    assert recorder.take_peaks() == (1, 0)
    assert recorder.take_peaks() == (0, 0)
    engine.dispose()


def test_a_static_pool_tracks_every_checkout_not_its_one_record(
    registry: CollectorRegistry, watched: list[poolwatch.PoolWatch]
) -> None:
    """StaticPool hands its one record to every checkout and checks it in once; a leaked checkout
    followed by other use of the engine must stay visible."""
    engine = sa.create_engine("sqlite://", poolclass=StaticPool)
    watch = poolwatch.watch({"p": engine}, registry=registry, leak_threshold_seconds=0.2)
    watched.append(watch)
    recorder = recorder_of(watch)
    leaked = engine.connect()
    leaked.execute(sa.text("SELECT 1"))
    for _ in range(3):
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    assert value(registry, "poolwatch_connections", pool="p", state="used") == 1
    [entry] = list(recorder.open_checkouts.values())
    assert entry[3] is not None and entry[3][0].co_name == sys._getframe().f_code.co_name
    assert (
        value(registry, "poolwatch_checkouts_total", pool="p"),
        value(registry, "poolwatch_checkins_total", pool="p"),
    ) == (4, 3)
    wait_until(lambda: value(registry, "poolwatch_leaked_connections", pool="p") == 1, 5, "never flagged")
    leaked.close()
    assert value(registry, "poolwatch_connections", pool="p", state="used") == 0
    assert value(registry, "poolwatch_checkins_total", pool="p") == 4
    # A checkout nobody closes, lost to the garbage collector, is counted as reclaimed.
    lost = engine.connect()
    lost.execute(sa.text("SELECT 1"))
    del lost
    gc.collect()
    assert value(registry, "poolwatch_connections", pool="p", state="used") == 0
    assert value(registry, "poolwatch_gc_reclaimed_total", pool="p", route="<none>") == 1
    engine.dispose()


def test_no_checkout_age_is_ever_negative_under_churn(
    sync_url: str, registry: CollectorRegistry, watched: list[poolwatch.PoolWatch]
) -> None:
    engine = sa.create_engine(sync_url, pool_size=4, max_overflow=0)
    watch = poolwatch.watch({"p": engine}, registry=registry)
    watched.append(watch)
    recorder = recorder_of(watch)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            engine.connect().close()

    ages: list[float] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(3) as churners:
            for _ in range(3):
                churners.submit(churn)
            # Reads that found a checkout out: 20,000 of them, or as many as a minute gives.
            until = time.monotonic() + 60
            while len(ages) < 20_000 and time.monotonic() < until:
                live = recorder.live_checkouts()
                if live.count:
                    ages.append(live.oldest_age)
            stop.set()
    finally:
        sys.setswitchinterval(interval)
    assert len(ages) >= 1_000, "the churn was hardly seen"
    assert min(ages) >= 0.0
    engine.dispose()


def test_a_pool_timeout_explains_itself_in_a_note(
    sync_url: str, registry: CollectorRegistry, watched: list[poolwatch.PoolWatch]
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    watched.append(poolwatch.watch({"p": engine}, registry=registry))

    def hold_the_only_connection() -> Any:
        return engine.connect()

    holder = hold_the_only_connection()
    with pytest.raises(sa_exc.TimeoutError) as caught:
        engine.connect()
    holder.close()
    error = caught.value
    # Type and message as SQLAlchemy made them; the note comes beside them.
    assert type(error) is sa_exc.TimeoutError
    assert str(error).startswith("QueuePool limit of size 1 overflow 0 reached")
    [note] = error.__notes__
    assert note.startswith("poolwatch: pool 'p' has 1 connection(s) out: 1 held by <none>.")
    assert f"{shown_path(__file__)}:" in note
    assert "in test_a_pool_timeout_explains_itself_in_a_note.<locals>.hold_the_only_connection." in note
    assert note.endswith("0 other caller(s) still queued.")
    engine.dispose()


def test_the_timeout_note_can_be_turned_off(
    sync_url: str, registry: CollectorRegistry, watched: list[poolwatch.PoolWatch]
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0, pool_timeout=0.1)
    watched.append(poolwatch.watch({"p": engine}, registry=registry, timeout_note=False))
    holder = engine.connect()
    with pytest.raises(sa_exc.TimeoutError) as caught:
        engine.connect()
    holder.close()
    assert not hasattr(caught.value, "__notes__")
    engine.dispose()


def test_the_timeout_note_names_queued_callers_and_the_oldest_holder(
    sync_url: str, registry: CollectorRegistry, watched: list[poolwatch.PoolWatch]
) -> None:
    engine = sa.create_engine(sync_url, pool_size=2, max_overflow=0, pool_timeout=30)
    watched.append(poolwatch.watch({"p": engine}, registry=registry))
    first = engine.connect()
    time.sleep(0.05)
    second = engine.connect()
    recorder = recorder_of(watched[0])
    with ThreadPoolExecutor(2) as callers:
        futures = [callers.submit(lambda: engine.connect().close()) for _ in range(2)]
        wait_until(lambda: recorder.queued == 2, 10, "two never queued")
        # A third caller gives up behind them (a short timeout for this one call).
        engine.pool._timeout = 0.1  # type: ignore[attr-defined]
        try:
            with pytest.raises(sa_exc.TimeoutError) as caught:
                engine.connect()
        finally:
            engine.pool._timeout = 30  # type: ignore[attr-defined]
        first.close()
        second.close()
        for future in futures:
            future.result()
    [note] = caught.value.__notes__
    assert "2 connection(s) out: 2 held by <none>." in note
    assert note.endswith("2 other caller(s) still queued.")
    engine.dispose()
