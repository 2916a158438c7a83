"""Two edges of the checkout hook, exactly: the use count of a connection the pool opened before it
was watched, and a caller that times out without ever waiting while another caller waits."""

from __future__ import annotations

import json
import threading

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import poolwatch
from poolwatch._serve.state import StateBuilder
from tests.fault_fixtures import wait_until
from tests.metrics import scrape
from tests.serve.test_page_state_rows import _rows


def test_a_connection_opened_before_the_pool_was_watched_counts_its_uses_from_then(
    sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0)
    for _ in range(3):  # three checkouts nobody watched
        with engine.connect():
            pass
    watch = poolwatch.watch(engine, registry=registry, name="uses")
    recorders = list(zip(watch.pool_names, watch.recorders, strict=True))
    try:
        seen = []
        for _ in range(2):
            with engine.connect():
                (row,) = _rows(json.loads(StateBuilder().build(recorders, None)))
                seen.append(row["uses"])
        # The checkouts poolwatch saw: the first is the first, not the fourth nor a second.
        assert seen == [1, 2]
    finally:
        watch.close()
        engine.dispose()


def test_a_caller_that_times_out_without_waiting_while_another_waits_gets_the_pools_own_error(
    sync_url: str, registry: CollectorRegistry
) -> None:
    """SQLAlchemy's queue raises at once, without waiting, when a caller's time is already up as it
    arrives (a pool timeout of 0, or a deadline passed before it could wait). Such a caller must
    get SQLAlchemy's ``TimeoutError``, counted, even while another caller is queued."""
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0, pool_timeout=10)
    watch = poolwatch.watch(engine, registry=registry, name="no_wait")
    (recorder,) = watch.recorders
    outcome: list[object] = []

    def queue() -> None:
        try:
            with engine.connect() as connection:
                outcome.append(connection.exec_driver_sql("SELECT 1").scalar())
        except BaseException as error:
            outcome.append(error)

    held = engine.connect()
    waiter = threading.Thread(target=queue)
    try:
        waiter.start()
        wait_until(lambda: recorder.queued == 1, 10, "the first caller never queued")
        engine.pool._timeout = 0  # type: ignore[attr-defined]  # the next caller's time is up
        with pytest.raises(sa.exc.TimeoutError):
            engine.connect()
        engine.pool._timeout = 10  # type: ignore[attr-defined]
    finally:
        held.close()
        waiter.join(10)
    try:
        assert outcome == [1]
        samples = scrape(registry)
        assert samples.total("poolwatch_timeouts_total", pool="no_wait") == 1
        assert samples.value("poolwatch_checkouts_queued_total", pool="no_wait") == 1
        assert samples.value("poolwatch_checkouts_total", pool="no_wait") == 2
    finally:
        watch.close()
        engine.dispose()
