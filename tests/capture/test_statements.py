"""Statements as the dialect wrapper files them, with no database: each lands under its operation,
and a statement that raises is counted under its operation and the driver's exception class."""

from __future__ import annotations

import sqlite3

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import poolwatch
from poolwatch._capture.pool_hooks import recorder_of
from tests.fake_dbapi import engine_for_test

STATEMENTS = {
    "SELECT 1": "SELECT",
    "  -- a comment first\n/* and another */ (SELECT 2)": "SELECT",
    "WITH t AS (SELECT 1) SELECT * FROM t": "SELECT",
    "insert into t values (1)": "INSERT",
    "UPDATE t SET x = 1": "UPDATE",
    "DELETE FROM t": "DELETE",
    "SAVEPOINT sp": "TRANSACTION",
    "CREATE TABLE t (x int)": "DDL",
    "VACUUM": "OTHER",
}


def test_each_statement_lands_under_its_operation() -> None:
    with engine_for_test() as (engine, dbapi):
        watch = poolwatch.watch(engine, registry=CollectorRegistry(), name="ops")
        with engine.connect() as connection:
            for statement in STATEMENTS:
                connection.exec_driver_sql(statement)
        recorder = recorder_of(engine.pool)
        assert recorder is not None
        counts = {operation: sum(copy.counts) for operation, copy in recorder.snapshot().query.items()}
        watch.close()
    expected = {"SELECT": 3, "INSERT": 1, "UPDATE": 1, "DELETE": 1, "TRANSACTION": 1, "DDL": 1, "OTHER": 1}
    assert counts == expected
    assert dbapi.connections[0].statements[-len(STATEMENTS) :] == list(STATEMENTS)


def test_a_failing_statement_is_counted_by_operation_and_driver_error() -> None:
    with engine_for_test() as (engine, dbapi):
        watch = poolwatch.watch(engine, registry=CollectorRegistry(), name="errors")
        with engine.connect() as connection:
            dbapi.connections[0].fail_next = sqlite3.OperationalError("no such table: t")
            with pytest.raises(sa.exc.OperationalError):
                connection.exec_driver_sql("DELETE FROM t")
        recorder = recorder_of(engine.pool)
        assert recorder is not None
        snapshot = recorder.snapshot()
        watch.close()
    assert snapshot.query_errors == {("DELETE", "OperationalError"): 1}
    assert sum(snapshot.query["DELETE"].counts) == 0  # timed only when it completed
