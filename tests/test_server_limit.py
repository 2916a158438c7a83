"""The server's connection limit and the `server` label, against real PostgreSQL and MariaDB.

The limit is read by the ``/health/db`` probe on its own checkout, after its ping: never on a
connection the application uses, never on an extra connection. The probe's connection must go
back exactly as SQLAlchemy expects it (no transaction open, no cursor left), even when the read
fails, and the probe's answer must not depend on the read.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.testclient import TestClient

import poolwatch
from poolwatch._capture.pool_hooks import recorder_of
from poolwatch._log import internal_errors
from poolwatch._record.server import server_label
from poolwatch._serve import server_limit
from tests.metrics import scrape

MARIADB = "127.0.0.1", 3306


def pg_client_limit(postgres_url: str) -> int:
    with psycopg.connect(postgres_url) as connection:
        row = connection.execute(
            "SELECT current_setting('max_connections')::int,"
            " current_setting('superuser_reserved_connections')::int"
        ).fetchone()
    assert row is not None
    return int(row[0]) - int(row[1])


def pool_info(registry: CollectorRegistry, pool: str) -> dict[str, str]:
    (labels,) = [labels for labels, _ in scrape(registry).find("poolwatch_pool_info", pool=pool)]
    return labels


def server_max(registry: CollectorRegistry, pool: str) -> list[float]:
    return [value for _, value in scrape(registry).find("poolwatch_server_connections_max", pool=pool)]


def _health(engine: sa.Engine, registry: CollectorRegistry, name: str) -> TestClient:
    """An app whose only poolwatch part in play is /health/db, probing on every call."""
    app = Starlette()
    poolwatch.instrument(app, engine, registry=registry, name=name, health_cache_seconds=0)
    return TestClient(app)


def test_postgresql_limit_is_read_by_the_probe_and_its_connection_left_clean(
    postgres_url: str, sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=2, max_overflow=0)
    try:
        with _health(engine, registry, "pg") as client:
            url = make_url(sync_url)
            assert pool_info(registry, "pg")["server"] == f"{url.host}:{url.port or 5432}/{url.database}"
            # The application's own checkouts never ask the server anything.
            with engine.connect() as connection:
                assert connection.execute(sa.text("SELECT 7")).scalar_one() == 7
            assert server_max(registry, "pg") == []
            assert client.get("/health/db").json()["status"] == "ok"
            assert server_max(registry, "pg") == [pg_client_limit(postgres_url)]
            assert scrape(registry).value("poolwatch_connects_total", pool="pg") == 1  # no extra connection
            with engine.connect() as connection:  # the probe's connection, back in the pool
                dbapi = connection.connection.dbapi_connection
                assert isinstance(dbapi, psycopg.Connection)
                assert dbapi.info.transaction_status == psycopg.pq.TransactionStatus.IDLE

            recorder = recorder_of(engine.pool)
            assert recorder is not None and recorder.server_limit_read_at is not None
            first_read = recorder.server_limit_read_at
            # A second probe within the hour does not ask again.
            assert client.get("/health/db").json()["status"] == "ok"
            assert recorder.server_limit_read_at == first_read
            # An hour later the next probe reads it again.
            recorder.server_limit_read_at = first_read - server_limit.REFRESH_SECONDS - 1
            recorder.server_connections_max = None
            assert client.get("/health/db").json()["status"] == "ok"
            assert recorder.server_limit_read_at > first_read
            assert server_max(registry, "pg") == [pg_client_limit(postgres_url)]
    finally:
        engine.dispose()


async def test_asyncpg_reads_the_limit_inside_sqlalchemys_greenlet(
    postgres_url: str, async_url: str, registry: CollectorRegistry
) -> None:
    engine = create_async_engine(async_url, pool_size=1, max_overflow=0)
    app = Starlette()
    poolwatch.instrument(app, engine, registry=registry, name="apg", health_cache_seconds=0)
    errors_before = internal_errors.count
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/health/db")).json()["status"] == "ok"
        assert server_max(registry, "apg") == [pg_client_limit(postgres_url)]
        async with engine.connect() as connection:  # the probe's connection, back in the pool
            raw = await connection.get_raw_connection()
            assert raw.driver_connection is not None
            assert not raw.driver_connection.is_in_transaction()
            assert (await connection.execute(sa.text("SELECT 7"))).scalar_one() == 7
        assert internal_errors.count == errors_before
    finally:
        await engine.dispose()


def test_a_failed_read_is_counted_and_changes_nothing_else(
    sync_url: str, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server that refuses the query (here: a function that does not exist) aborts the
    # transaction the SELECT began; nobody may inherit that, and the probe still says ok.
    monkeypatch.setitem(server_limit.QUERIES, "postgresql", "SELECT poolwatch_no_such_function()")
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0)
    errors_before = internal_errors.count
    try:
        with _health(engine, registry, "pg-refused") as client:
            assert client.get("/health/db").json()["status"] == "ok"
            assert internal_errors.count == errors_before + 1
            assert server_max(registry, "pg-refused") == []
            with engine.connect() as connection:
                dbapi = connection.connection.dbapi_connection
                assert isinstance(dbapi, psycopg.Connection)
                assert dbapi.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                assert connection.execute(sa.text("SELECT 7")).scalar_one() == 7
    finally:
        engine.dispose()


def _mariadb_reachable() -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(MARIADB) == 0


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """A database of our own on the MariaDB server of this machine (root, no password)."""
    import pymysql

    if not _mariadb_reachable():
        pytest.fail(f"no MariaDB/MySQL server on {MARIADB[0]}:{MARIADB[1]} (root, empty password)")
    name = f"poolwatch_limit_{uuid.uuid4().hex[:10]}"
    admin = pymysql.connect(host=MARIADB[0], port=MARIADB[1], user="root", password="")
    try:
        with admin.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE `{name}`")
        yield f"mysql+pymysql://root@{MARIADB[0]}:{MARIADB[1]}/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


def test_mariadb_limit_and_label(mariadb_url: str, registry: CollectorRegistry) -> None:
    engine = sa.create_engine(mariadb_url, pool_size=1, max_overflow=0)
    try:
        with _health(engine, registry, "maria") as client:
            url = make_url(mariadb_url)
            assert pool_info(registry, "maria")["server"] == f"127.0.0.1:3306/{url.database}"
            assert client.get("/health/db").json()["status"] == "ok"
            with engine.connect() as connection:  # the probe's connection, back in the pool
                # MariaDB says whether this session is inside a transaction; ours was rolled back.
                in_transaction = connection.exec_driver_sql("SELECT @@in_transaction").scalar_one()
                assert in_transaction == 0
                expected = int(connection.exec_driver_sql("SELECT @@max_connections").scalar_one())
            assert server_max(registry, "maria") == [expected]
            assert scrape(registry).value("poolwatch_connects_total", pool="maria") == 1
    finally:
        engine.dispose()


def test_sqlite_has_a_file_path_and_no_limit(tmp_path: Path, registry: CollectorRegistry) -> None:
    path = tmp_path / "limit.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        with _health(engine, registry, "lite") as client:
            assert client.get("/health/db").status_code == 200
            assert pool_info(registry, "lite")["server"] == str(path)
            assert server_max(registry, "lite") == []
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("url", "label"),
    [
        (
            "postgresql+psycopg://app:s3cret@db.internal/shop?sslmode=require&password=x",
            "db.internal:5432/shop",
        ),
        ("postgresql+asyncpg://app:s3cret@10.0.0.5:6432/shop", "10.0.0.5:6432/shop"),
        ("mysql+pymysql://root:pw@maria:3307/app?charset=utf8mb4", "maria:3307/app"),
        ("mariadb+pymysql://root@maria/app", "maria:3306/app"),
        ("sqlite://", ":memory:"),
        ("sqlite:////var/data/app.db", "/var/data/app.db"),
    ],
)
def test_server_label_never_carries_credentials(url: str, label: str) -> None:
    assert server_label(make_url(url)) == label
