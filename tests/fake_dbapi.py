"""A DBAPI connection that talks to no database, for the unit layer (no server needed).

As SQLAlchemy's own pool tests do (``test/engine/test_pool.py``, ``MockDBAPI``), a real ``QueuePool``
hands out these connections; an Engine is built around that pool (``create_engine(pool=...)``) so
poolwatch watches it the way it watches any engine. Statements go through the dialect's real
``do_execute`` to ``FakeCursor.execute``, which only writes down what it was given.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import QueuePool


class FakeCursor:
    description = None
    rowcount = -1
    lastrowid = None
    arraysize = 1

    def __init__(self, connection: FakeConnection) -> None:
        self.connection = connection

    def execute(self, statement: str, parameters: Any = None) -> None:
        if self.connection.fail_next is not None:
            error, self.connection.fail_next = self.connection.fail_next, None
            raise error
        self.connection.statements.append(statement)

    def executemany(self, statement: str, parameters: Any) -> None:
        self.execute(statement, parameters)

    def fetchone(self) -> tuple[Any, ...] | None:
        return (0,)  # what SQLite's dialect asks at first connect (PRAGMA read_uncommitted)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return []

    def close(self) -> None:
        pass


class FakeConnection:
    def __init__(self) -> None:
        self.statements: list[str] = []
        self.closed = False
        self.rollbacks = 0
        self.fail_next: Exception | None = None

    def cursor(self) -> FakeCursor:
        return FakeCursor(self)

    def rollback(self) -> None:
        self.rollbacks += 1

    def commit(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def create_function(self, *args: Any, **kwargs: Any) -> None:
        """SQLite's dialect registers a REGEXP function on each new connection."""


class FakeDBAPI:
    """Makes FakeConnections and remembers them."""

    def __init__(self) -> None:
        self.connections: list[FakeConnection] = []

    def connect(self) -> FakeConnection:
        connection = FakeConnection()
        self.connections.append(connection)
        return connection


def fake_engine(
    pool_size: int = 2, max_overflow: int = 0, timeout: float = 30.0
) -> tuple[sa.Engine, FakeDBAPI]:
    """An Engine over a real QueuePool of fake connections (SQLite's dialect names the SQL)."""
    dbapi = FakeDBAPI()
    creator: Any = dbapi.connect  # a FakeConnection has only what SQLAlchemy calls on it
    pool = QueuePool(creator, pool_size=pool_size, max_overflow=max_overflow, timeout=timeout)
    return sa.create_engine("sqlite://", pool=pool), dbapi


@contextmanager
def engine_for_test(**kwargs: Any) -> Iterator[tuple[sa.Engine, FakeDBAPI]]:
    engine, dbapi = fake_engine(**kwargs)
    try:
        yield engine, dbapi
    finally:
        engine.dispose()
