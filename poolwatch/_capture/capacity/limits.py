"""What to ask each kind of server for its connection limit, and what its answer means.

The limit that matters to a pool is the one its own connections run into, so it is the smallest of:

- PostgreSQL: the slots ordinary clients may use (``max_connections`` minus
  ``superuser_reserved_connections``, and from version 16 minus ``reserved_connections`` too),
  the session role's ``CONNECTION LIMIT`` (``pg_roles.rolconnlimit``) and the database's
  (``pg_database.datconnlimit``); -1 means none. PostgreSQL does not enforce the role's and the
  database's limits on superusers, so for a superuser they are left out. The reserved slots are
  always left out: they are the administrators' way in when the clients have taken the rest.
- MySQL and MariaDB: ``max_connections``, and the account's ``MAX_USER_CONNECTIONS``: the session
  value of ``@@max_user_connections`` is the account's own limit when it has one, else the global
  one (0: none).

Behind a connection pooler or a proxy (PgBouncer, pgcat, ProxySQL, a cloud proxy) the server that
answers the query is not the endpoint the pool connects to, and its limit is not the pool's: the
pooler decides how many server connections the pool's connections become. So the answer also says
where it came from, and a reading that came through something in between claims no limit:

- the port the server answering listens on differs from the URL's port (PgBouncer and pgcat
  listen on 6432, ProxySQL on 6033; through PgBouncer ``inet_server_port()`` is the backend's
  own port, so it never matches the pooler's); for a connection over a Unix socket the server's
  ``port`` setting names the socket, and is compared the same way;
- the URL names this machine (``localhost``, a loopback address, or a Unix socket) and the server
  answering sees the connection arrive on another machine's address, or over a Unix socket when
  the URL asked for TCP.

Addresses are compared only for loopback URLs: a Kubernetes Service or any DNAT in front of a
server gives the server another address than the one the client dialled, with no pooler between.
A pooler on another machine that listens on the server's own port is therefore not detected; the
setting ``server_connections_max`` (a number, or ``off``) covers that case.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

# One round trip. ``reserved_connections`` is asked with missing_ok, so the same text runs on every
# version and the version decides (in Python) whether it counts. The role is the session's: that
# is the one PostgreSQL counts against ``CONNECTION LIMIT``, whatever SET ROLE did since.
POSTGRESQL_QUERY = (
    "SELECT current_setting('server_version_num')::int,"
    " current_setting('max_connections')::int,"
    " current_setting('superuser_reserved_connections')::int,"
    " current_setting('reserved_connections', true),"
    " r.rolsuper, r.rolconnlimit,"
    " (SELECT d.datconnlimit FROM pg_catalog.pg_database d WHERE d.datname = current_database()),"
    " host(inet_server_addr()), inet_server_port(), current_setting('port')::int"
    " FROM pg_catalog.pg_roles r WHERE r.rolname = session_user"
)
MYSQL_QUERY = "SELECT @@global.max_connections, @@session.max_user_connections, @@global.port"

QUERIES = {"postgresql": POSTGRESQL_QUERY, "mysql": MYSQL_QUERY, "mariadb": MYSQL_QUERY}
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}
# Version 16 added reserved_connections (slots for members of pg_use_reserved_connections).
_PG_RESERVED_CONNECTIONS_SINCE = 160000


@dataclass(frozen=True)
class Endpoint:
    """Where the pool's URL says the server is."""

    port: int
    # The URL names this machine: a loopback host, or a Unix socket.
    local: bool
    # The connection goes over TCP (not known to be a Unix socket).
    tcp: bool


@dataclass(frozen=True)
class Reading:
    """What the server said: its limit for this pool's connections, or why none is claimed."""

    limit: int | None
    # Set when something between the pool and the server answered for it: the reason, for the log.
    pooler: str | None = None


def query_for(dialect_name: str) -> str | None:
    return QUERIES.get(dialect_name)


def endpoint_of(url: Any) -> Endpoint | None:
    """The endpoint of a SQLAlchemy URL, for the dialects poolwatch knows how to ask."""
    backend = str(url.get_backend_name())
    default_port = DEFAULT_PORTS.get(backend)
    if default_port is None:
        return None
    query = dict(url.query)
    host = url.host or _single(query.get("host")) or ""
    socket_path = host.startswith("/") or bool(_single(query.get("unix_socket")))
    if backend == "postgresql" and not host:
        # libpq (psycopg) goes to the default Unix socket without a host; asyncpg tries that
        # socket, then localhost: this machine either way.
        socket_path = True
    port = url.port or _as_int(_single(query.get("port"))) or default_port
    return Endpoint(port=port, local=socket_path or _is_loopback_name(host), tcp=not socket_path)


def read_postgresql(row: tuple[Any, ...], endpoint: Endpoint) -> Reading:
    (
        version,
        max_connections,
        superuser_reserved,
        reserved_text,
        superuser,
        role_limit,
        database_limit,
        server_address,
        server_port,
        port_setting,
    ) = row
    # A TCP connection arrived at inet_server_port(); a Unix-socket one (address NULL) at the
    # socket the server's port setting names.
    answered_port = int(server_port) if server_port is not None else int(port_setting)
    pooler = _pooler_between(endpoint, answered_port, server_address, address_known=True)
    if pooler is not None:
        return Reading(None, pooler)
    reserved = int(superuser_reserved)
    if int(version) >= _PG_RESERVED_CONNECTIONS_SINCE and reserved_text:
        reserved += int(reserved_text)
    limits = [int(max_connections) - reserved]
    if not superuser:
        limits += [int(n) for n in (role_limit, database_limit) if n is not None and int(n) >= 0]
    return Reading(max(0, min(limits)))


def read_mysql(row: tuple[Any, ...], endpoint: Endpoint) -> Reading:
    max_connections, user_limit, port = row
    pooler = _pooler_between(endpoint, int(port), None, address_known=False)
    if pooler is not None:
        return Reading(None, pooler)
    limits = [int(max_connections)]
    if user_limit is not None and int(user_limit) > 0:
        limits.append(int(user_limit))
    return Reading(max(0, min(limits)))


READERS = {"postgresql": read_postgresql, "mysql": read_mysql, "mariadb": read_mysql}


def interpret(dialect_name: str, row: tuple[Any, ...] | None, endpoint: Endpoint) -> Reading:
    if row is None:
        return Reading(None)
    return READERS[dialect_name](tuple(row), endpoint)


def _pooler_between(
    endpoint: Endpoint, answered_port: int, server_address: str | None, *, address_known: bool
) -> str | None:
    if answered_port != endpoint.port:
        return "the server answering listens on another port than the URL's"
    if not (address_known and endpoint.local):
        return None
    if server_address is None:
        if endpoint.tcp:
            return "the URL asks for TCP and the server answering was reached over a Unix socket"
        return None
    if not _is_loopback_name(server_address):
        return "the URL names this machine and the server answering is on another"
    return None


def _is_loopback_name(host: str) -> bool:
    if host.lower() in {"localhost", "localhost.localdomain", "ip6-localhost"}:
        return True
    try:
        # host() gives "::1" or "127.0.0.1"; a URL may bracket an IPv6 address.
        address = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, from a dual-stack socket
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def _single(value: Any) -> str | None:
    # A URL query value may be repeated (a tuple): libpq's multi-host lists; take the first.
    if isinstance(value, tuple):
        value = value[0] if value else None
    return None if value is None else str(value)


def _as_int(value: str | None) -> int | None:
    try:
        return None if value is None else int(value.split(",")[0])
    except ValueError:
        return None
