"""The database server's connection limit, read by the health probe on its own checkout.

Forty pods whose pools are each fine can together ask for more connections than the server allows;
only the fleet's sum against the server's limit shows it. So each pool reports that limit
(``poolwatch_server_connections_max``). It is read where poolwatch already uses a connection of
its own: the ``/health/db`` probe, after its ping succeeded, on the connection it checked out. It
is never read on a connection the application uses (an extra query and rollback there is visible to
the application: SQLAlchemy's own suite counts the calls on a fresh connection and fails), and
poolwatch never opens or checks out a connection for it.

The probe's connection is left as it found it: the cursor is closed and the transaction the query
began is rolled back (``dialect.do_rollback``), whatever happened, before the probe returns it. On
asyncio drivers the probe pings inside SQLAlchemy's greenlet, and the adapted cursor awaits there.

Read once per pool and again at most once an hour, because the limit changes only with a server
restart. A failure is swallowed and counted, and not retried for the same hour. SQLite and dialects
without a known query report nothing. Until the first probe the series is absent.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .._log import internal_errors

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect

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


def read_if_due(recorder: PoolRecorder, dialect: Dialect, dbapi_connection: Any) -> None:
    """Read the limit on the probe's connection if it was never read, or not for an hour."""
    query = limit_query(dialect)
    if query is None:
        return
    try:
        now = time.monotonic()
        last = recorder.server_limit_read_at
        if last is not None and now - last < REFRESH_SECONDS:
            return
        recorder.server_limit_read_at = now
        recorder.server_connections_max = read_limit(dialect, dbapi_connection, query)
    except Exception as error:
        internal_errors.record("server_limit", error)


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
