"""Which database server a pool talks to, as a label that groups pools across a fleet."""

from __future__ import annotations

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
