"""What the dialect hooks count besides statement times, exactly: connections being opened and
pre-pings in flight come back to zero (after a success and after a failure), a ping that answers
False names itself as the invalidation's reason, and statements run with ``executemany`` or without
parameters are statements of their checkout."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import poolwatch
from poolwatch._capture import dialect_hooks
from poolwatch._record.recorder import PoolRecorder
from tests.metrics import scrape
from tests.serve import test_probe_pings as pings


@pytest.fixture
def scripted(sync_url: str, registry: CollectorRegistry) -> Iterator[tuple[sa.Engine, PoolRecorder]]:
    url = sa.make_url(sync_url).set(drivername="postgresql+scripted_psycopg")
    engine = sa.create_engine(url, pool_size=2, max_overflow=0, pool_pre_ping=True)
    watch = poolwatch.watch(engine, registry=registry, name="dialect")
    (recorder,) = watch.recorders
    yield engine, recorder
    pings._script = None
    watch.close()
    engine.dispose()


def test_opening_and_pinging_come_back_to_zero(scripted: tuple[sa.Engine, PoolRecorder]) -> None:
    engine, recorder = scripted
    for _ in range(3):
        with engine.connect() as connection:  # opens once, then pre-pings the pooled connection
            connection.execute(sa.text("SELECT 1"))
    assert (recorder.connects, recorder.opening, recorder.pinging) == (1, 0, 0)


def test_a_ping_that_answers_false_is_the_invalidations_reason(
    scripted: tuple[sa.Engine, PoolRecorder], registry: CollectorRegistry
) -> None:
    engine, recorder = scripted
    with engine.connect():
        pass
    pings._script = pings._Script(lambda n: False if n == 0 else None)
    with engine.connect() as connection:  # the pooled one answers False: a fresh one is opened
        connection.execute(sa.text("SELECT 1"))
    samples = scrape(registry)
    assert samples.value("poolwatch_pre_ping_failures_total", pool="dialect") == 1
    assert samples.value("poolwatch_invalidations_total", pool="dialect", reason="PingReturnedFalse") == 1
    assert (recorder.connects, recorder.opening, recorder.pinging) == (2, 0, 0)


def test_a_failed_connect_leaves_nothing_opening(sync_url: str, registry: CollectorRegistry) -> None:
    refused = sa.make_url(sync_url).set(port=1, query={"connect_timeout": "5"})
    engine = sa.create_engine(refused)
    watch = poolwatch.watch(engine, registry=registry, name="refused")
    (recorder,) = watch.recorders
    try:
        for _ in range(2):
            with pytest.raises(sa.exc.OperationalError):
                engine.connect()
        assert recorder.opening == 0
    finally:
        watch.close()
        engine.dispose()


def test_statements_by_executemany_and_without_parameters_count_for_their_checkout(
    sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url)
    watch = poolwatch.watch(engine, registry=registry, name="many")
    (recorder,) = watch.recorders
    try:
        with engine.connect() as connection:
            # cursor.execute(statement), no parameters at all: do_execute_no_params
            connection.execution_options(no_parameters=True).exec_driver_sql(
                "CREATE TEMPORARY TABLE t (n int)"
            )
            connection.execute(sa.text("INSERT INTO t VALUES (:n)"), [{"n": 1}, {"n": 2}])  # executemany
            usage: list[Any] = next(iter(recorder.open_checkouts.values()))[7]
            assert usage[0] == 2
    finally:
        watch.close()
        engine.dispose()


def test_a_statement_of_no_time_is_in_the_first_bucket(
    sync_url: str, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the lowest bound (here: no time at all, on a clock that stands still) is the first
    bucket, exactly."""
    monkeypatch.setattr(dialect_hooks, "perf_counter", lambda: 1000.0)
    engine = sa.create_engine(sync_url)
    with engine.connect():  # the dialect's first-connect statements, before it is watched
        pass
    watch = poolwatch.watch(engine, registry=registry, name="still")
    (recorder,) = watch.recorders
    try:
        with engine.connect() as connection:
            for _ in range(3):
                connection.execute(sa.text("SELECT 1"))
        histogram = recorder.query["SELECT"]
        assert (histogram.counts[0], sum(histogram.counts), histogram.total) == (3, 3, 0.0)
    finally:
        watch.close()
        engine.dispose()
