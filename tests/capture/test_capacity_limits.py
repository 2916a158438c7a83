"""The server's connection limit read from its answer, row by row, and the endpoint read from a URL.

tests/test_server_limit.py and tests/test_capacity.py ask real servers (PostgreSQL with role and
database limits, MariaDB, PgBouncer); here each rule of poolwatch/_capture/capacity/limits.py is
held against the rows that would fool it: a limit of 0 or 1, -1 for "none", a superuser, version
15 against 16, a pooler on another port, a Unix socket where TCP was asked, a multi-host URL.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from poolwatch._capture.capacity.limits import (
    MYSQL_QUERY,
    POSTGRESQL_QUERY,
    Endpoint,
    Reading,
    endpoint_of,
    interpret,
    query_for,
)

LOCAL_TCP = Endpoint(port=5432, local=True, tcp=True)
LOCAL_SOCKET = Endpoint(port=5432, local=True, tcp=False)
REMOTE = Endpoint(port=5432, local=False, tcp=True)

OTHER_PORT = "the server answering listens on another port than the URL's"
SOCKET_FOR_TCP = "the URL asks for TCP and the server answering was reached over a Unix socket"
ANOTHER_MACHINE = "the URL names this machine and the server answering is on another"


def pg_row(
    *,
    version: int = 150004,
    max_connections: int = 100,
    superuser_reserved: int = 3,
    reserved: str | None = None,
    superuser: bool = False,
    role_limit: int | None = -1,
    database_limit: int | None = -1,
    address: str | None = "127.0.0.1",
    server_port: int | None = 5432,
    port_setting: int = 5432,
) -> tuple[object, ...]:
    # As PostgreSQL returns it: numbers as ints, reserved_connections as text (current_setting).
    return (
        version,
        max_connections,
        superuser_reserved,
        reserved,
        superuser,
        role_limit,
        database_limit,
        address,
        server_port,
        port_setting,
    )


@pytest.mark.parametrize(
    ("row", "endpoint", "expected"),
    [
        # The ordinary clients' slots: max_connections minus the superusers' reserve.
        (pg_row(), LOCAL_TCP, Reading(97)),
        (pg_row(max_connections=20, superuser_reserved=0), LOCAL_TCP, Reading(20)),
        # reserved_connections counts from version 16 only; on 15 the text is not a setting.
        (pg_row(version=160000, reserved="5"), LOCAL_TCP, Reading(92)),
        (pg_row(version=159999, reserved="5"), LOCAL_TCP, Reading(97)),
        (pg_row(version=160000, reserved=""), LOCAL_TCP, Reading(97)),
        (pg_row(version=160000, reserved=None), LOCAL_TCP, Reading(97)),
        # The role's and the database's CONNECTION LIMIT, the smallest wins; -1 is none, 0 is zero.
        (pg_row(role_limit=10), LOCAL_TCP, Reading(10)),
        (pg_row(database_limit=7, role_limit=10), LOCAL_TCP, Reading(7)),
        (pg_row(role_limit=0), LOCAL_TCP, Reading(0)),
        (pg_row(role_limit=1), LOCAL_TCP, Reading(1)),
        (pg_row(role_limit=-1, database_limit=None), LOCAL_TCP, Reading(97)),
        (pg_row(role_limit=None, database_limit=-1), LOCAL_TCP, Reading(97)),
        (pg_row(role_limit=200), LOCAL_TCP, Reading(97)),
        # A superuser is not held to either: PostgreSQL does not enforce them on superusers.
        (pg_row(superuser=True, role_limit=10, database_limit=5), LOCAL_TCP, Reading(97)),
        # Never negative, whatever the settings say.
        (pg_row(max_connections=2, superuser_reserved=3), LOCAL_TCP, Reading(0)),
        # Through a pooler: another port answers; no limit is claimed.
        (pg_row(server_port=5433), LOCAL_TCP, Reading(None, OTHER_PORT)),
        (pg_row(server_port=5432), Endpoint(port=6432, local=True, tcp=True), Reading(None, OTHER_PORT)),
        # Over a Unix socket the address and port are NULL: the port setting names the socket.
        (pg_row(address=None, server_port=None), LOCAL_SOCKET, Reading(97)),
        (pg_row(address=None, server_port=None, port_setting=6432), LOCAL_SOCKET, Reading(None, OTHER_PORT)),
        # The URL asked for TCP to this machine and the server saw a Unix socket: something between.
        (pg_row(address=None, server_port=None), LOCAL_TCP, Reading(None, SOCKET_FOR_TCP)),
        # ... and another machine's address seen for a loopback URL.
        (pg_row(address="10.0.0.7"), LOCAL_TCP, Reading(None, ANOTHER_MACHINE)),
        (pg_row(address="::1"), LOCAL_TCP, Reading(97)),
        (pg_row(address="::ffff:127.0.0.1"), LOCAL_TCP, Reading(97)),
        # A remote URL's address is never compared (a Service or DNAT changes it, no pooler between).
        (pg_row(address="10.0.0.7"), REMOTE, Reading(97)),
        (pg_row(address=None, server_port=None), REMOTE, Reading(97)),
    ],
)
def test_postgresql_rows(row: tuple[object, ...], endpoint: Endpoint, expected: Reading) -> None:
    assert interpret("postgresql", row, endpoint) == expected


MYSQL = Endpoint(port=3306, local=True, tcp=True)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ((151, 0, 3306), Reading(151)),  # 0: no account limit
        ((151, None, 3306), Reading(151)),
        ((151, 10, 3306), Reading(10)),
        ((151, 1, 3306), Reading(1)),
        ((151, 500, 3306), Reading(151)),
        ((0, 0, 3306), Reading(0)),
        # A loopback URL's address is not known here: only the port can tell a proxy (ProxySQL).
        ((151, 10, 6033), Reading(None, OTHER_PORT)),
    ],
)
def test_mysql_and_mariadb_rows(row: tuple[object, ...], expected: Reading) -> None:
    assert interpret("mysql", row, MYSQL) == expected
    assert interpret("mariadb", row, MYSQL) == expected


def test_no_row_is_no_limit() -> None:
    assert interpret("postgresql", None, LOCAL_TCP) == Reading(None)
    assert interpret("mysql", None, MYSQL) == Reading(None)


def test_each_dialect_gets_its_own_query_and_others_none() -> None:
    assert query_for("postgresql") == POSTGRESQL_QUERY
    assert query_for("mysql") == query_for("mariadb") == MYSQL_QUERY
    assert query_for("sqlite") is None
    assert query_for("oracle") is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql+psycopg://u@127.0.0.1/db", Endpoint(5432, local=True, tcp=True)),
        ("postgresql+psycopg://u@localhost:5433/db", Endpoint(5433, local=True, tcp=True)),
        ("postgresql+psycopg://u@LOCALHOST/db", Endpoint(5432, local=True, tcp=True)),
        ("postgresql+psycopg://u@[::1]:5434/db", Endpoint(5434, local=True, tcp=True)),
        ("postgresql+psycopg://u@db.internal:6432/db", Endpoint(6432, local=False, tcp=True)),
        ("postgresql+psycopg://u@10.1.2.3/db", Endpoint(5432, local=False, tcp=True)),
        # No host: libpq's default socket, this machine.
        ("postgresql+psycopg://u@/db", Endpoint(5432, local=True, tcp=False)),
        ("postgresql+asyncpg://u@/db?host=/var/run/postgresql", Endpoint(5432, local=True, tcp=False)),
        ("postgresql+psycopg://u@/db?host=/tmp&port=5439", Endpoint(5439, local=True, tcp=False)),
        # libpq's multi-host form: the first host and the first port.
        (
            "postgresql+psycopg://u@/db?host=h1&host=h2&port=6432&port=5432",
            Endpoint(6432, local=False, tcp=True),
        ),
        ("postgresql+psycopg://u@/db?host=localhost&port=6433,5432", Endpoint(6433, local=True, tcp=True)),
        ("postgresql+psycopg://u@/db?host=localhost&port=notaport", Endpoint(5432, local=True, tcp=True)),
        ("mysql+pymysql://root@127.0.0.1/db", Endpoint(3306, local=True, tcp=True)),
        ("mariadb+pymysql://root@db.internal:3307/db", Endpoint(3307, local=False, tcp=True)),
        (
            "mysql+pymysql://root@localhost/db?unix_socket=/run/mysqld/mysqld.sock",
            Endpoint(3306, local=True, tcp=False),
        ),
        ("sqlite:///x.db", None),
    ],
)
def test_the_endpoint_a_url_names(url: str, expected: Endpoint | None) -> None:
    assert endpoint_of(sa.make_url(url)) == expected


@pytest.mark.parametrize(
    ("failures", "seconds"),
    [
        (1, 5.0),
        (2, 10.0),
        (3, 20.0),
        (4, 40.0),
        (5, 80.0),
        (6, 160.0),
        (7, 300.0),
        (8, 300.0),
        (10_000, 300.0),
    ],
)
def test_a_failed_read_is_retried_after_a_doubling_delay_with_jitter_below_it(
    failures: int, seconds: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5 s, doubling, at most 5 minutes; each drawn from the last quarter below it, so pods that
    failed together do not retry together."""
    import random

    from poolwatch._capture.capacity import reader

    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    assert reader.retry_delay(failures) == seconds
    monkeypatch.setattr(random, "uniform", lambda low, high: low)
    assert reader.retry_delay(failures) == seconds * 0.75


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("localhost.localdomain", True),
        ("ip6-localhost", True),
        ("LocalHost", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::1%lo", True),  # an IPv6 address with its zone
        ("::ffff:127.0.0.1", True),
        ("10.0.0.7", False),
        ("fe80::1%eth0", False),
        ("db.internal", False),
        ("", False),
    ],
)
def test_which_hosts_name_this_machine(host: str, loopback: bool) -> None:
    from poolwatch._capture.capacity.limits import _is_loopback_name

    assert _is_loopback_name(host) is loopback
