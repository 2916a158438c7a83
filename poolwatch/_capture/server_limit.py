"""The database server's connection limit, read on a connection the pool has just opened.

Forty pods whose pools are each fine can together ask for more connections than the server allows;
only the fleet's sum against the server's limit shows it. So each pool reports that limit
(``poolwatch_server_connections_max``), read on the pool's own connection: a pool ``connect``
listener, which runs on the new DBAPI connection after SQLAlchemy's dialect set it up (its
``first_connect`` initialize and its own ``connect`` listeners come first), before anyone uses it.
poolwatch never opens a connection for it.

The connection is left as SQLAlchemy leaves it after ``dialect.initialize()``: the cursor is closed
and the transaction the query began is rolled back (``dialect.do_rollback``), whatever happened. The
query goes to the DBAPI cursor directly, not through the dialect, so it is not timed or counted as
the application's. On asyncio drivers the listener runs inside SQLAlchemy's greenlet (the pool
connects there), so the adapted cursor's ``execute`` awaits as SQLAlchemy's own first-connect does.

Read once per pool and again at most once an hour (on a later new connection), because the limit
changes only with a server restart. A failure is swallowed and counted, and not retried for the
same hour. SQLite and dialects without a known query report nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event

from .._log import internal_errors
from .pool_hooks import watched_by

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect, Engine

    from .._record.recorder import PoolRecorder

REFRESH_SECONDS = 3600.0

# The limit available to ordinary clients: PostgreSQL keeps superuser_reserved_connections of
# max_connections for superusers; MySQL and MariaDB allow max_connections (+1 for SUPER) clients.
QUERIES = {
    "postgresql": (
        "SELECT current_setting('max_connections')::int"
        " - current_setting('superuser_reserved_connections')::int"
    ),
    "mysql": "SELECT @@max_connections",
    "mariadb": "SELECT @@max_connections",
}


def limit_query(dialect: Dialect) -> str | None:
    return QUERIES.get(str(getattr(dialect, "name", "")))


class ServerLimitListener:
    """The ``connect`` listener of one engine, kept to be taken off again."""

    def __init__(self, recorder: PoolRecorder) -> None:
        self.recorder = recorder
        self._listener: Callable[[Any, Any], None] | None = None

    def install(self, engine: Engine) -> None:
        query = limit_query(engine.dialect)
        if query is None:
            return
        recorder = self.recorder
        dialect = engine.dialect

        def on_connect(dbapi_connection: Any, record: Any) -> None:
            try:
                now = time.monotonic()
                last = recorder.server_limit_read_at
                if (last is not None and now - last < REFRESH_SECONDS) or not watched_by(record, recorder):
                    return
                recorder.server_limit_read_at = now
                recorder.server_connections_max = read_limit(dialect, dbapi_connection, query)
            except Exception as error:
                internal_errors.record("server_limit", error)

        event.listen(engine, "connect", on_connect)
        self._listener = on_connect

    def remove(self, engine: Engine) -> None:
        if self._listener is not None and event.contains(engine, "connect", self._listener):
            event.remove(engine, "connect", self._listener)
        self._listener = None


def read_limit(dialect: Dialect, dbapi_connection: Any, query: str) -> int | None:
    """Run ``query`` on the fresh connection and leave it with no transaction and no cursor open."""
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(query)
            row = cursor.fetchone()
        finally:
            cursor.close()
    finally:
        # Always, as SQLAlchemy's first_connect does after initialize(): the SELECT began a
        # transaction (or aborted one) that the application must not inherit.
        dialect.do_rollback(dbapi_connection)
    if not row or row[0] is None:
        return None
    return int(row[0])
