"""Which database server and role a pool talks to, as labels that group pools across a fleet."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

# Ports the URL may leave out; filled in so that pods that spell the port and pods that do not
# still group under one server.
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433, "oracle": 1521}


def server_label(url: Any) -> str:
    """``host:port/database`` of a SQLAlchemy URL (the file path for SQLite); never a user name,
    a password or a query string, which may carry credentials."""
    backend = str(url.get_backend_name())
    database = str(url.database or "")
    if backend == "sqlite":
        return database or ":memory:"
    host = url.host or "localhost"
    port = url.port or DEFAULT_PORTS.get(backend)
    address = f"{host}:{port}" if port else str(host)
    return f"{address}/{database}"


# The key of the role tag. Fixed, so every pod of a fleet (and every poolwatch version) computes the
# same tag for the same role on the same server, which is what lets Prometheus sum their pools.
_ROLE_TAG_KEY = b"poolwatch role tag v1"
ROLE_TAG_LENGTH = 12


def role_tag(url: Any) -> str:
    """A stable tag for the URL's user name on its server: the first 12 hex digits of an HMAC-SHA256.

    The label ``role`` of ``poolwatch_pool_info`` carries it, so the fleet's capacity can be summed
    per server, role and database (a role's ``CONNECTION LIMIT`` counts that role's connections
    only) without the user name in any series. It cannot be read back into the name; someone who
    can see the series and guesses a name can check the guess, as with any unsalted pseudonym, so
    it hides the name from reading, not from a targeted guess. The server label is part of the
    message: one role name on two servers gives two unrelated tags. SQLite has no roles: "".
    """
    if str(url.get_backend_name()) == "sqlite":
        return ""
    message = f"{server_label(url)}\n{url.username or ''}".encode()
    return hmac.new(_ROLE_TAG_KEY, message, hashlib.sha256).hexdigest()[:ROLE_TAG_LENGTH]
