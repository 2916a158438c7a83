"""Whether a checkout's connection sits inside an open transaction, read without a round trip.

Held-idle time (hold time minus time waiting on the database) splits into time idle inside an open
transaction and the rest. Idle in a transaction is what hurts the server: the session keeps its
locks and its snapshot, so vacuum cannot clean up behind it.

The statement timer asks the driver, after each statement, whether a transaction is open; each
driver keeps that from the server's last reply, so asking costs no round trip: psycopg's
``pgconn.transaction_status`` (what ``info.transaction_status`` reads), asyncpg's
``is_in_transaction()`` (its protocol's, which that method asks), psycopg2's
``info.transaction_status``, sqlite3's ``in_transaction``, PyMySQL's ``server_status`` flag. If a
transaction is open, the idle stretch that follows starts at the end of the statement and ends at
the next statement, at a commit or rollback (the dialect's ``do_commit``/``do_rollback``) or at
checkin. A driver with none of these gives no reader, and its checkouts show no idle-in-transaction
time.

The stretch is kept in the checkout's usage list (``CheckoutEntry.usage``):
``[statements, seconds in statements, seconds idle in transaction, stretch began (0.0: none),
seconds in statements when it began]``. Fetches on a server-side cursor inside the stretch add to
the seconds in statements (``streamed_rows``), so they are taken out of it: waiting on rows is not
idle.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Any

# How the value read is turned into "a transaction is open" (inline in the statement timer: on a
# per-statement path a Python call costs as much as the read, and ``attrgetter`` makes none).
LIBPQ_STATUS = 0  # libpq's PQTRANS_*: INTRANS (2) and INERROR (3, aborted) are open
FLAG = 1  # a bool
METHOD = 2  # a bound method answering a bool (asyncpg's protocol)
MYSQL_STATUS = 3  # MySQL's server status flags, SERVER_STATUS_IN_TRANS = 1

# (driver, is_async) -> (attribute path from the DBAPI connection SQLAlchemy holds, how to read it)
_PATHS: dict[tuple[str, bool], tuple[str, int]] = {
    ("psycopg", False): ("pgconn.transaction_status", LIBPQ_STATUS),
    ("psycopg", True): ("_connection.pgconn.transaction_status", LIBPQ_STATUS),
    ("psycopg2", False): ("info.transaction_status", LIBPQ_STATUS),
    ("asyncpg", True): ("_connection._protocol.is_in_transaction", METHOD),
    ("pysqlite", False): ("in_transaction", FLAG),
    ("aiosqlite", True): ("_connection.in_transaction", FLAG),
    ("pymysql", False): ("server_status", MYSQL_STATUS),
    ("aiomysql", True): ("_connection.server_status", MYSQL_STATUS),
    ("asyncmy", True): ("_connection.server_status", MYSQL_STATUS),
}

TransactionReader = tuple[Callable[[Any], Any], int]


def transaction_reader(dialect: Any) -> TransactionReader | None:
    """How to read this dialect's DBAPI connections, or None where no way is known."""
    driver = getattr(dialect, "driver", None)
    found = _PATHS.get((str(driver), bool(getattr(dialect, "is_async", False))))
    return None if found is None else (attrgetter(found[0]), found[1])


def is_open(value: Any, mode: int) -> bool:
    """What ``value``, read the reader's way, says (the statement timer has this inline)."""
    if mode == LIBPQ_STATUS:
        return bool(value == 2 or value == 3)
    if mode == FLAG:
        return bool(value)
    if mode == METHOD:
        return bool(value())
    return bool(value & 1)
