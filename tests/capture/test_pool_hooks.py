"""Checkout, checkin, timeout and leak counts from the pool hooks, with no database: a real QueuePool
over fake DBAPI connections (SQLAlchemy's own pool tests work the same way)."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import poolwatch
from poolwatch._capture.pool_hooks import recorder_of
from poolwatch._record.recorder import PoolRecorder
from tests.fake_dbapi import engine_for_test


def _recorder(engine: sa.Engine) -> PoolRecorder:
    recorder = recorder_of(engine.pool)
    assert recorder is not None
    return recorder


def test_checkouts_and_checkins_are_exact_under_threads() -> None:
    threads, cycles = 4, 250
    with engine_for_test(pool_size=2, max_overflow=1) as (engine, dbapi):
        watch = poolwatch.watch(engine, registry=CollectorRegistry(), name="busy")
        start = threading.Barrier(threads)

        def work() -> None:
            start.wait()
            for _ in range(cycles):
                engine.pool.connect().close()

        workers = [threading.Thread(target=work) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        snapshot = _recorder(engine).snapshot()
        watch.close()
    assert snapshot.checkouts == snapshot.checkins == threads * cycles
    assert sum(snapshot.wait.counts) == threads * cycles
    assert sum(snapshot.use[("<none>", "<none>")].counts) == threads * cycles
    assert sum(snapshot.held_idle["<none>"].counts) == threads * cycles
    assert snapshot.connects == len(dbapi.connections)
    # An overflow connection returned to a full pool is closed, and a later checkout may open
    # another: how many are opened in all depends on scheduling, how many are open at once does not.
    assert snapshot.connects - snapshot.disconnects <= 3
    assert snapshot.live.count == 0 and snapshot.pending == 0


def test_a_timeout_is_counted_once_and_its_wait_observed() -> None:
    with engine_for_test(pool_size=1, timeout=0.01) as (engine, _):
        watch = poolwatch.watch(engine, registry=CollectorRegistry(), name="tight")
        held = engine.pool.connect()
        for _ in range(3):
            with pytest.raises(sa.exc.TimeoutError):
                engine.pool.connect()
        snapshot = _recorder(engine).snapshot()
        held.close()
        watch.close()
    assert snapshot.timeouts == {"<none>": 3}
    assert snapshot.checkouts == 1 and snapshot.live.count == 1
    assert sum(snapshot.wait.counts) == 4  # every call into Pool.connect(), failed or not
    assert snapshot.pending == 0


def test_each_checkout_held_too_long_is_one_leak_however_it_is_found() -> None:
    """Flagged by the sweeper while out, or crossed since its last pass and seen at checkin:
    counted exactly once either way; a short checkout never."""
    threshold = 0.05
    with engine_for_test(pool_size=3) as (engine, _):
        watch = poolwatch.watch(
            engine, registry=CollectorRegistry(), name="leaky", leak_threshold_seconds=threshold
        )
        recorder = _recorder(engine)
        engine.pool.connect().close()  # short: no leak
        held = [engine.pool.connect(), engine.pool.connect()]
        time.sleep(threshold * 4)
        recorder.sweep()  # flags both (the sweeper thread may have flagged them already)
        during = recorder.snapshot()
        late = engine.pool.connect()
        time.sleep(threshold * 4)
        late.close()  # crossed the threshold: counted at checkin unless the sweeper saw it first
        for connection in held:
            connection.close()
        recorder.sweep()
        after = recorder.snapshot()
        watch.close()
    assert during.leaks == {"<none>": 2} and during.live.leaked == 2
    assert after.leaks == {"<none>": 3}
    assert after.live.count == 0 and after.live.leaked == 0
    assert after.checkouts == after.checkins == 4
