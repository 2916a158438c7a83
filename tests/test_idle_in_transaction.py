"""Idle in transaction (issue 27 §2), on real PostgreSQL with psycopg (sync) and asyncpg.

Held-idle time splits by whether a transaction was open, read from the driver without a round trip.
What would fool it: idle after a commit, after a rollback, or in autocommit (no transaction open,
so not idle in one), and a streamed read inside a transaction (waiting on rows, not idle).
Sleeps give lower bounds only: no test here depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import create_async_engine

import poolwatch
from poolwatch._capture.pool_hooks import recorder_of
from poolwatch._record import events
from poolwatch._record.events import IdleInTransaction
from poolwatch._serve.state import CONNECTION_FIELDS, StateBuilder
from tests.metrics import scrape

PAUSE = 0.3


@pytest.fixture
def taken() -> Iterator[list[Any]]:
    found: list[Any] = []
    previous = events.set_sinks([found.append])
    yield found
    events.set_sinks(previous)


def _histogram(registry: CollectorRegistry, name: str, pool: str) -> tuple[float, float]:
    """(count, sum) of ``name`` over the pool's routes."""
    samples = scrape(registry)
    return samples.total(f"{name}_count", pool=pool), samples.total(f"{name}_sum", pool=pool)


def _in_transaction(registry: CollectorRegistry, pool: str) -> float:
    return _histogram(registry, "poolwatch_idle_in_transaction_seconds", pool)[1]


def _held_idle(registry: CollectorRegistry, pool: str) -> float:
    return _histogram(registry, "poolwatch_held_idle_seconds", pool)[1]


def _idle_events(taken: list[Any]) -> list[IdleInTransaction]:
    return [event for event in taken if isinstance(event, IdleInTransaction)]


def test_psycopg_idle_inside_a_transaction_is_split_from_idle_outside(
    sync_url: str, registry: CollectorRegistry, taken: list[Any]
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1)
    poolwatch.watch(engine, registry=registry, name="tx", idle_in_transaction_seconds=PAUSE / 2)
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")  # autobegin: a transaction is open now
            time.sleep(PAUSE)  # idle inside it
            connection.commit()
            time.sleep(PAUSE)  # idle, but no transaction is open
        in_transaction, held_idle = _in_transaction(registry, "tx"), _held_idle(registry, "tx")
        assert in_transaction >= PAUSE
        # The sleep after the commit is held idle, never idle in a transaction.
        assert held_idle - in_transaction >= PAUSE
        [event] = _idle_events(taken)
        assert event.pool == "tx" and event.route == "<none>"
        assert event.seconds_idle_in_transaction >= PAUSE
        assert event.site.startswith("tests/test_idle_in_transaction.py:")
        assert event.function == "test_psycopg_idle_inside_a_transaction_is_split_from_idle_outside"
    finally:
        engine.dispose()


def test_psycopg_idle_after_rollback_and_in_autocommit_is_not_in_a_transaction(
    sync_url: str, registry: CollectorRegistry, taken: list[Any]
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1)
    poolwatch.watch(engine, registry=registry, name="none", idle_in_transaction_seconds=PAUSE / 2)
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
            connection.rollback()
            time.sleep(PAUSE)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("SELECT 1")
            time.sleep(PAUSE)
        assert _held_idle(registry, "none") >= 2 * PAUSE
        assert _in_transaction(registry, "none") < PAUSE
        assert _idle_events(taken) == []
    finally:
        engine.dispose()


def test_psycopg_a_failed_statement_leaves_an_aborted_transaction_open(
    sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1)
    poolwatch.watch(engine, registry=registry, name="aborted")
    try:
        with engine.connect() as connection:
            with pytest.raises(sa.exc.ProgrammingError):
                connection.exec_driver_sql("SELECT no_such_column FROM pg_class")
            time.sleep(PAUSE)  # "idle in transaction (aborted)" on the server
        assert _in_transaction(registry, "aborted") >= PAUSE
    finally:
        engine.dispose()


def test_psycopg_streamed_rows_inside_a_transaction_are_not_idle(
    sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1)
    poolwatch.watch(engine, registry=registry, name="stream")
    try:
        with engine.connect() as connection:
            result = connection.execution_options(stream_results=True, max_row_buffer=1).exec_driver_sql(
                "SELECT pg_sleep(0.1) FROM generate_series(1, 4)"
            )
            rows = result.fetchall()
        assert len(rows) == 4
        count, in_transaction = _histogram(registry, "poolwatch_idle_in_transaction_seconds", "stream")
        assert count == 1
        # The fetches (three pg_sleep(0.1) after the first row) waited on the database inside the
        # transaction: none of that is idle, so idle in the transaction stays within held idle
        # (which leaves the fetches out); counted as idle, it would exceed it by 0.3 s.
        assert in_transaction <= _held_idle(registry, "stream") + 1e-6
    finally:
        engine.dispose()


def test_the_live_page_shows_idle_in_transaction_while_the_checkout_is_out(
    sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1)
    watch = poolwatch.watch(engine, registry=registry, name="page")
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
            time.sleep(PAUSE)
            [recorder] = watch.recorders
            state = json.loads(StateBuilder().build([("page", recorder)], None))
            [row] = state["pools"][0]["connections"]
            fields = dict(zip(CONNECTION_FIELDS, row, strict=True))
            assert fields["idle_in_transaction_ms"] >= PAUSE * 1000
            assert fields["after_response_ms"] is None  # not in a request
    finally:
        engine.dispose()


async def test_asyncpg_idle_inside_a_transaction_is_split_from_idle_outside(
    async_url: str, registry: CollectorRegistry, taken: list[Any]
) -> None:
    engine = create_async_engine(async_url, pool_size=1)
    poolwatch.watch(engine, registry=registry, name="atx", idle_in_transaction_seconds=PAUSE / 2)
    try:
        async with engine.connect() as connection:
            await connection.exec_driver_sql("SELECT 1")
            await asyncio.sleep(PAUSE)
            await connection.commit()
            await asyncio.sleep(PAUSE)
        async with engine.connect() as connection:  # no transaction ever open: nothing
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            await connection.exec_driver_sql("SELECT 1")
            await asyncio.sleep(PAUSE)
        in_transaction, held_idle = _in_transaction(registry, "atx"), _held_idle(registry, "atx")
        assert in_transaction >= PAUSE
        assert held_idle - in_transaction >= 2 * PAUSE
        [event] = _idle_events(taken)
        assert event.site.startswith("tests/test_idle_in_transaction.py:")
        assert event.seconds_idle_in_transaction >= PAUSE
    finally:
        await engine.dispose()


def test_a_checkout_below_the_threshold_logs_nothing(
    sync_url: str, registry: CollectorRegistry, taken: list[Any]
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1)
    poolwatch.watch(engine, registry=registry, name="quiet", idle_in_transaction_seconds=3600)
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
            time.sleep(PAUSE)
        assert _in_transaction(registry, "quiet") >= PAUSE
        assert _idle_events(taken) == []
        assert recorder_of(engine.pool) is not None
    finally:
        engine.dispose()
