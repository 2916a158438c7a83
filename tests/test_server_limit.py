"""The connection limit of a pool's role and database, read apart from the probe, on real servers.

What is checked, against real PostgreSQL and MariaDB:

- the limit is the smallest of the server's slots for clients, the role's ``CONNECTION LIMIT`` and
  the database's (throwaway roles and databases, dropped afterwards), except for a superuser, whom
  PostgreSQL does not hold to those two; MariaDB's account ``MAX_USER_CONNECTIONS``;
- the read checks out an idle connection only, opens none, queues behind nobody, and gives the
  connection back with no transaction and no cursor open;
- a failed, timed-out or cancelled read is retried after a backoff and then stored (the old code
  set its clock before reading, so a cancelled read was not tried again for an hour);
- the setting gives the limit or turns the read off, from the environment's strings;
- the labels: ``server`` never carries credentials, ``role`` is a stable tag that names nobody.

Pooler detection against a real PgBouncer, the slow link and the alert are in test_capacity.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import poolwatch
from poolwatch._capture.capacity import ensure_read, limits, reader
from poolwatch._capture.pool_hooks import recorder_of
from poolwatch._log import internal_errors
from poolwatch._record.recorder import PoolRecorder
from poolwatch._record.server import role_tag, server_label
from tests.metrics import scrape
from tests.proxy import FaultProxy

MARIADB = "127.0.0.1", 3306


def pg_client_limit(postgres_url: str) -> int:
    """The server's slots for clients: max_connections minus the reserved ones of its version."""
    with psycopg.connect(postgres_url) as connection:
        row = connection.execute(
            "SELECT current_setting('server_version_num')::int, current_setting('max_connections')::int,"
            " current_setting('superuser_reserved_connections')::int,"
            " coalesce(current_setting('reserved_connections', true), '0')::int"
        ).fetchone()
    assert row is not None
    version, max_connections, superuser_reserved, reserved = (int(value) for value in row)
    return max_connections - superuser_reserved - (reserved if version >= 160000 else 0)


@pytest.fixture
def link(postgres_url: str) -> Iterator[FaultProxy]:
    """A TCP link to the test server that keeps its port: the fault proxy listening on another
    loopback address (127.x.y.z) on the server's own port. To poolwatch this is the server reached
    over a network (it may add latency or stall), not a pooler or proxy on another port."""
    upstream = make_url(postgres_url)
    port = upstream.port or 5432
    for _ in range(5):
        address = f"127.{random.randrange(1, 255)}.{random.randrange(0, 255)}.{random.randrange(2, 255)}"
        fault = FaultProxy(port, upstream.host or "127.0.0.1", lifetime=120, listen=(address, port))
        try:
            fault.start()
        except RuntimeError:  # that address's port is taken: try another
            continue
        try:
            yield fault
        finally:
            fault.stop()
        return
    pytest.fail("no loopback address with a free port for the link")


def through(postgres_url: str, link: FaultProxy, driver: str) -> str:
    """The test server's URL through ``link``, for ``driver``."""
    url = make_url(postgres_url).set(drivername=f"postgresql+{driver}", host=link.listen[0])
    return url.render_as_string(hide_password=False)


def server_max(registry: CollectorRegistry, pool: str) -> list[float]:
    return [value for _, value in scrape(registry).find("poolwatch_server_connections_max", pool=pool)]


def pool_info(registry: CollectorRegistry, pool: str) -> dict[str, str]:
    (labels,) = [labels for labels, _ in scrape(registry).find("poolwatch_pool_info", pool=pool)]
    return labels


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


async def await_until(condition: Callable[[], bool], what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def read_done(recorder: PoolRecorder) -> Callable[[], bool]:
    """True once a read ran and finished (stored a reading, or failed)."""
    state = reader.reader_state(recorder)
    return lambda: not state.running and (recorder.server_limit_read_at is not None or state.failures > 0)


def watched(
    engine: sa.Engine | AsyncEngine, registry: CollectorRegistry, name: str, **settings: object
) -> PoolRecorder:
    poolwatch.watch(engine, registry=registry, name=name, **settings)  # type: ignore[arg-type]
    pool = engine.sync_engine.pool if isinstance(engine, AsyncEngine) else engine.pool
    recorder = recorder_of(pool)
    assert recorder is not None
    return recorder


def warm_sync(engine: sa.Engine) -> None:
    """Two idle connections in the pool: a read never takes the last one."""
    with engine.connect() as first, engine.connect() as second:
        first.execute(sa.text("SELECT 1"))
        second.execute(sa.text("SELECT 1"))


async def warm_async(engine: AsyncEngine) -> None:
    async with engine.connect() as first, engine.connect() as second:
        await first.execute(sa.text("SELECT 1"))
        await second.execute(sa.text("SELECT 1"))


def read_sync(engine: sa.Engine, recorder: PoolRecorder) -> None:
    """Warm the pool (two idle connections), ask for a read and wait for it to finish."""
    warm_sync(engine)
    ensure_read(recorder)
    wait_until(read_done(recorder), "the limit read")


# -- throwaway roles and databases --------------------------------------------------------------


class Throwaway:
    """Roles and databases created for one test on the shared server, dropped after it."""

    def __init__(self, postgres_url: str) -> None:
        self.admin = psycopg.connect(postgres_url, autocommit=True)
        self.roles: list[str] = []
        self.databases: list[str] = []

    def role(self, limit: int, *, superuser: bool = False) -> str:
        name = f"pw_role_{uuid.uuid4().hex[:10]}"
        kind = "SUPERUSER" if superuser else "NOSUPERUSER"
        self.admin.execute(f"CREATE ROLE {name} LOGIN {kind} CONNECTION LIMIT {limit}")
        self.roles.append(name)
        return name

    def database(self, limit: int, owner: str) -> str:
        name = f"pw_db_{uuid.uuid4().hex[:10]}"
        self.admin.execute(f"CREATE DATABASE {name} OWNER {owner} CONNECTION LIMIT {limit}")
        self.databases.append(name)
        return name

    def close(self) -> None:
        try:
            for name in self.databases:
                self.admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            for name in self.roles:
                self.admin.execute(f"DROP ROLE IF EXISTS {name}")
        finally:
            self.admin.close()


@pytest.fixture
def throwaway(postgres_url: str) -> Iterator[Throwaway]:
    made = Throwaway(postgres_url)
    try:
        yield made
    finally:
        made.close()


def url_as(postgres_url: str, driver: str, user: str, database: str) -> str:
    url = make_url(postgres_url).set(drivername=f"postgresql+{driver}", username=user, database=database)
    return url.render_as_string(hide_password=False)


# -- PostgreSQL: which limit ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role_limit", "database_limit", "expected"),
    [
        (4, 3, 3),  # the database's limit is the smallest
        (4, 9, 4),  # the role's
        (-1, -1, None),  # neither: the server's slots for clients
    ],
)
def test_postgresql_limit_is_the_smallest_of_server_role_and_database(
    postgres_url: str,
    throwaway: Throwaway,
    registry: CollectorRegistry,
    role_limit: int,
    database_limit: int,
    expected: int | None,
) -> None:
    role = throwaway.role(role_limit)
    database = throwaway.database(database_limit, owner=role)
    engine = sa.create_engine(url_as(postgres_url, "psycopg", role, database), pool_size=2, max_overflow=0)
    try:
        recorder = watched(engine, registry, "pg")
        read_sync(engine, recorder)
        assert server_max(registry, "pg") == [
            expected if expected is not None else pg_client_limit(postgres_url)
        ]
    finally:
        engine.dispose()


async def test_asyncpg_reads_the_role_limit_on_the_loop_that_owns_its_connections(
    postgres_url: str, throwaway: Throwaway, registry: CollectorRegistry
) -> None:
    role = throwaway.role(5)
    database = throwaway.database(-1, owner=role)
    engine = create_async_engine(url_as(postgres_url, "asyncpg", role, database), pool_size=2, max_overflow=0)
    errors_before = internal_errors.count
    try:
        recorder = watched(engine, registry, "apg")
        await warm_async(engine)
        ensure_read(recorder)  # on this loop, which opened the connections
        await await_until(read_done(recorder), "the limit read")
        assert server_max(registry, "apg") == [5]
        async with engine.connect() as connection:  # the read's connection, back in the pool
            raw = await connection.get_raw_connection()
            assert raw.driver_connection is not None
            assert not raw.driver_connection.is_in_transaction()
        samples = scrape(registry)
        assert samples.value("poolwatch_connects_total", pool="apg") == 2
        # The read's checkout is poolwatch's own, filed under <probe>, not under the caller's route.
        assert samples.total("poolwatch_use_seconds_count", pool="apg", route="<probe>") == 1
        assert internal_errors.count == errors_before
    finally:
        await engine.dispose()


def test_a_superuser_is_not_held_to_the_role_and_database_limits(
    postgres_url: str, throwaway: Throwaway, registry: CollectorRegistry
) -> None:
    # PostgreSQL does not enforce CONNECTION LIMIT on superusers: claiming 2 here would page
    # someone about a limit that refuses nothing.
    role = throwaway.role(2, superuser=True)
    database = throwaway.database(2, owner=role)
    engine = sa.create_engine(url_as(postgres_url, "psycopg", role, database), pool_size=2, max_overflow=0)
    try:
        recorder = watched(engine, registry, "su")
        read_sync(engine, recorder)
        assert server_max(registry, "su") == [pg_client_limit(postgres_url)]
    finally:
        engine.dispose()


# -- PostgreSQL: which connection, and how it is left ----------------------------------------------


def test_the_read_uses_an_idle_connection_and_leaves_it_clean(
    postgres_url: str, sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=2, max_overflow=0)
    try:
        recorder = watched(engine, registry, "pg")
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT 7")).scalar_one() == 7
        assert server_max(registry, "pg") == []  # the application's checkouts never ask
        read_sync(engine, recorder)
        assert server_max(registry, "pg") == [pg_client_limit(postgres_url)]
        samples = scrape(registry)
        assert samples.value("poolwatch_connects_total", pool="pg") == 2  # no extra connection
        assert samples.total("poolwatch_use_seconds_count", pool="pg", route="<probe>") == 1
        with engine.connect() as connection:  # the read's connection, back in the pool
            dbapi = connection.connection.dbapi_connection
            assert isinstance(dbapi, psycopg.Connection)
            assert dbapi.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        # A second call within the refresh period asks nothing.
        first = recorder.server_limit_read_at
        ensure_read(recorder)
        assert not reader.reader_state(recorder).running
        assert recorder.server_limit_read_at == first
    finally:
        engine.dispose()


@pytest.mark.parametrize("max_overflow", [0, 5])
def test_no_spare_idle_connection_means_no_read_no_new_connection_and_no_queueing(
    sync_url: str, registry: CollectorRegistry, max_overflow: int
) -> None:
    # With the pooled connections in the application's hands, a checkout would open an overflow
    # connection (max_overflow 5) or queue behind the application (0); with one of them idle, it
    # would take the last one and leave the next caller to open or queue. None of that happens.
    engine = sa.create_engine(sync_url, pool_size=2, max_overflow=max_overflow, pool_timeout=30)
    try:
        recorder = watched(engine, registry, "busy")
        warm_sync(engine)
        with engine.connect() as first:
            first.execute(sa.text("SELECT 1"))
            for held in (2, 1):  # both connections held, then one
                with engine.connect() if held == 2 else contextlib.nullcontext() as second:
                    if second is not None:
                        second.execute(sa.text("SELECT 1"))
                    checkouts = recorder.checkouts
                    for _ in range(3):
                        ensure_read(recorder)
                    assert not reader.reader_state(recorder).running
                    assert recorder.checkouts == checkouts
                    assert recorder.connects == 2
                    assert recorder.pending == 0
        assert recorder.server_limit_read_at is None
        ensure_read(recorder)  # both idle again: one is spare, and it is read
        wait_until(read_done(recorder), "the limit read")
        assert recorder.server_connections_max is not None
        assert recorder.connects == 2
    finally:
        engine.dispose()


def test_a_failed_read_is_retried_with_backoff_and_then_stored(
    postgres_url: str, sync_url: str, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server refuses the query (a function that does not exist): the transaction it aborted
    # is rolled back, the connection goes back to the pool, and the read is tried again later.
    monkeypatch.setitem(limits.QUERIES, "postgresql", "SELECT poolwatch_no_such_function()")
    monkeypatch.setattr(reader, "RETRY_FIRST_SECONDS", 0.3)
    engine = sa.create_engine(sync_url, pool_size=2, max_overflow=0)
    errors_before = internal_errors.count
    try:
        recorder = watched(engine, registry, "refused")
        read_sync(engine, recorder)
        state = reader.reader_state(recorder)
        assert state.failures == 1
        assert internal_errors.count == errors_before + 1
        assert server_max(registry, "refused") == []
        assert state.next_at > time.monotonic()  # backoff: not at once
        ensure_read(recorder)
        assert not state.running
        with engine.connect() as connection:  # clean, and not thrown away
            dbapi = connection.connection.dbapi_connection
            assert isinstance(dbapi, psycopg.Connection)
            assert dbapi.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert recorder.connects == 2

        monkeypatch.undo()  # the server answers again
        wait_until(lambda: time.monotonic() >= state.next_at, "the backoff to pass")
        ensure_read(recorder)
        wait_until(lambda: recorder.server_limit_read_at is not None, "the retried read")
        assert server_max(registry, "refused") == [pg_client_limit(postgres_url)]
        assert state.failures == 0
    finally:
        engine.dispose()


def test_backoff_doubles_up_to_its_cap() -> None:
    first, third = reader.retry_delay(1), reader.retry_delay(3)
    assert reader.RETRY_FIRST_SECONDS * 0.75 <= first <= reader.RETRY_FIRST_SECONDS
    assert third >= reader.RETRY_FIRST_SECONDS * 4 * 0.75 > first
    assert reader.retry_delay(50) <= reader.RETRY_MAX_SECONDS


@pytest.mark.parametrize("how", ["cancelled", "timed out"])
async def test_a_cancelled_or_timed_out_async_read_is_retried_and_stored(
    postgres_url: str,
    link: FaultProxy,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    monkeypatch.setattr(reader, "RETRY_FIRST_SECONDS", 0.3)
    if how == "timed out":
        monkeypatch.setattr(reader, "READ_TIMEOUT_SECONDS", 1.0)
    engine = create_async_engine(through(postgres_url, link, "asyncpg"), pool_size=2, max_overflow=0)
    try:
        recorder = watched(engine, registry, "apg")
        state = reader.reader_state(recorder)
        await warm_async(engine)
        link.set_mode("stall")  # the read's query goes out and no answer comes back
        ensure_read(recorder)
        await await_until(lambda: isinstance(state.worker, asyncio.Task), "the read's task")
        task = state.worker
        assert isinstance(task, asyncio.Task)
        assert task in reader._tasks  # held until it ends: the loop holds tasks only weakly
        if how == "cancelled":
            await asyncio.sleep(0.2)
            task.cancel()
        await await_until(lambda: not state.running, "the read to end")
        await await_until(lambda: task not in reader._tasks, "the finished task to be let go")
        assert state.failures == 1
        assert recorder.server_limit_read_at is None
        assert server_max(registry, "apg") == []

        link.set_mode("pass")
        await await_until(lambda: time.monotonic() >= state.next_at, "the backoff to pass")
        # The cut-off connection was thrown away; the application's next requests open another.
        await warm_async(engine)
        ensure_read(recorder)
        await await_until(lambda: recorder.server_limit_read_at is not None, "the retried read")
        assert server_max(registry, "apg") == [pg_client_limit(postgres_url)]
    finally:
        link.set_mode("pass")
        await engine.dispose()


# -- MariaDB -------------------------------------------------------------------------------------


def _mariadb_reachable() -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(MARIADB) == 0


@pytest.fixture
def mariadb_admin() -> Iterator[object]:
    import pymysql

    if not _mariadb_reachable():
        pytest.fail(f"no MariaDB/MySQL server on {MARIADB[0]}:{MARIADB[1]} (root, empty password)")
    admin = pymysql.connect(host=MARIADB[0], port=MARIADB[1], user="root", password="", autocommit=True)
    try:
        yield admin
    finally:
        admin.close()


@pytest.fixture
def mariadb_url(mariadb_admin: object) -> Iterator[str]:
    """A database of our own on the MariaDB server of this machine (root, no password)."""
    name = f"poolwatch_limit_{uuid.uuid4().hex[:10]}"
    with mariadb_admin.cursor() as cursor:  # type: ignore[attr-defined]
        cursor.execute(f"CREATE DATABASE `{name}`")
    try:
        yield f"mysql+pymysql://root@{MARIADB[0]}:{MARIADB[1]}/{name}"
    finally:
        with mariadb_admin.cursor() as cursor:  # type: ignore[attr-defined]
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")


def test_mariadb_limit_is_max_connections_without_an_account_limit(
    mariadb_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(mariadb_url, pool_size=2, max_overflow=0)
    try:
        recorder = watched(engine, registry, "maria")
        assert pool_info(registry, "maria")["server"] == f"127.0.0.1:3306/{make_url(mariadb_url).database}"
        read_sync(engine, recorder)
        with engine.connect() as connection:  # the read's connection, back in the pool
            assert connection.exec_driver_sql("SELECT @@in_transaction").scalar_one() == 0
            expected = int(connection.exec_driver_sql("SELECT @@global.max_connections").scalar_one())
        assert server_max(registry, "maria") == [expected]
        assert scrape(registry).value("poolwatch_connects_total", pool="maria") == 2
    finally:
        engine.dispose()


def test_mariadb_account_max_user_connections_is_the_limit(
    mariadb_admin: object, mariadb_url: str, registry: CollectorRegistry
) -> None:
    user = f"pw_{uuid.uuid4().hex[:10]}"
    database = make_url(mariadb_url).database
    with mariadb_admin.cursor() as cursor:  # type: ignore[attr-defined]
        cursor.execute(f"CREATE USER '{user}'@'%' WITH MAX_USER_CONNECTIONS 4")
        cursor.execute(f"GRANT ALL ON `{database}`.* TO '{user}'@'%'")
    engine = sa.create_engine(
        make_url(mariadb_url).set(username=user).render_as_string(hide_password=False),
        pool_size=2,
        max_overflow=0,
    )
    try:
        recorder = watched(engine, registry, "maria-user")
        read_sync(engine, recorder)
        assert server_max(registry, "maria-user") == [4]
    finally:
        engine.dispose()
        with mariadb_admin.cursor() as cursor:  # type: ignore[attr-defined]
            cursor.execute(f"DROP USER IF EXISTS '{user}'@'%'")


# -- the setting -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "series"),
    [("120", [120.0]), ("off", []), ("0", []), ("", None)],
    ids=["120", "off", "0", "unset"],
)
def test_the_setting_from_the_environment_gives_the_limit_or_turns_the_read_off(
    postgres_url: str,
    sync_url: str,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    series: list[float] | None,
) -> None:
    monkeypatch.setenv("POOLWATCH_SERVER_CONNECTIONS_MAX", variable)
    engine = sa.create_engine(sync_url, pool_size=2, max_overflow=0)
    try:
        recorder = watched(engine, registry, "set")
        assert server_max(registry, "set") == (series or [])  # from the start, before any read
        warm_sync(engine)
        checkouts = recorder.checkouts
        ensure_read(recorder)
        if series is None:  # unset: read from the server
            wait_until(read_done(recorder), "the limit read")
            assert server_max(registry, "set") == [pg_client_limit(postgres_url)]
        else:  # given or off: the server is never asked
            assert not reader.reader_state(recorder).running
            assert recorder.checkouts == checkouts
            assert server_max(registry, "set") == series
    finally:
        engine.dispose()


@pytest.mark.parametrize("bad", ["-1", "many", "2.5", "true"])
def test_a_bad_setting_is_refused_naming_it(sync_url: str, monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("POOLWATCH_SERVER_CONNECTIONS_MAX", bad)
    engine = sa.create_engine(sync_url)
    try:
        with pytest.raises(ValueError, match="POOLWATCH_SERVER_CONNECTIONS_MAX"):
            poolwatch.watch(engine, registry=CollectorRegistry())
    finally:
        engine.dispose()


def test_sqlite_has_a_file_path_no_role_and_no_limit(tmp_path: Path, registry: CollectorRegistry) -> None:
    path = tmp_path / "limit.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        recorder = watched(engine, registry, "lite")
        warm_sync(engine)
        ensure_read(recorder)
        assert not reader.reader_state(recorder).running
        info = pool_info(registry, "lite")
        assert info["server"] == str(path)
        assert info.get("role", "") == ""
        assert server_max(registry, "lite") == []
    finally:
        engine.dispose()


# -- labels ------------------------------------------------------------------------------------------


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


def test_role_tag_groups_one_role_on_one_server_and_names_nobody() -> None:
    tag = role_tag(make_url("postgresql+psycopg://shop_app:pw1@db:5432/shop"))
    assert re.fullmatch(r"[0-9a-f]{12}", tag), tag
    assert "shop" not in tag and "app" not in tag
    # Another pod: other driver, password, spelt-out default port: the same role on the same server.
    assert role_tag(make_url("postgresql+asyncpg://shop_app:other@db/shop")) == tag
    assert role_tag(make_url("postgresql+psycopg://reporting:pw1@db:5432/shop")) != tag
    assert role_tag(make_url("postgresql+psycopg://shop_app:pw1@db:5432/archive")) != tag
    assert role_tag(make_url("sqlite:///x.db")) == ""


def test_pool_info_carries_the_role_tag_not_the_user_name(registry: CollectorRegistry) -> None:
    url = "postgresql+psycopg://shop_owner_42:s3cret@127.0.0.1:5432/test"  # never connected to
    engine = sa.create_engine(url)
    try:
        watched(engine, registry, "tagged")
        info = pool_info(registry, "tagged")
        assert info["role"] == role_tag(make_url(url))
        assert not [value for value in info.values() if "shop_owner" in value or "s3cret" in value]
    finally:
        engine.dispose()


# -- where the answer comes from: the endpoint and the server answering -----------------------------


def _endpoint(url: str) -> limits.Endpoint:
    endpoint = limits.endpoint_of(make_url(url))
    assert endpoint is not None
    return endpoint


def _pg_row(address: str | None, port: int | None, port_setting: int = 5432) -> tuple[object, ...]:
    # version, max_connections, superuser_reserved, reserved, rolsuper, rolconnlimit, datconnlimit,
    # inet_server_addr, inet_server_port, port setting
    return (150000, 100, 3, None, False, -1, -1, address, port, port_setting)


@pytest.mark.parametrize(
    ("url", "address", "port", "pooled"),
    [
        ("postgresql://u@127.0.0.1:5432/d", "127.0.0.1", 5432, False),
        ("postgresql://u@localhost/d", "::1", 5432, False),  # localhost answered over IPv6
        ("postgresql://u@localhost/d", "127.0.0.1", 5432, False),
        ("postgresql://u@[::1]:5432/d", "::ffff:127.0.0.1", 5432, False),
        ("postgresql://u@/d", None, None, False),  # the default Unix socket
        ("postgresql://u@/d?host=/var/run/postgresql", None, None, False),
        ("postgresql://u@db.internal:5432/d", "10.1.2.3", 5432, False),  # DNS, a Service: same port
        # PgBouncer on 6432 in front of the server: inet_server_port() is the backend's, 5432.
        ("postgresql://u@127.0.0.1:6432/d", "127.0.0.1", 5432, True),
        ("postgresql://u@pgbouncer.internal:6432/d", "10.1.2.3", 5432, True),
        ("postgresql://u@/d?port=6432", None, None, True),  # PgBouncer's socket, .s.PGSQL.6432
        # A local proxy on the server's port, forwarding to another machine, or to a Unix socket.
        ("postgresql://u@127.0.0.1:5432/d", "10.1.2.3", 5432, True),
        ("postgresql://u@localhost:5432/d", None, None, True),
    ],
)
def test_a_pooler_or_proxy_in_between_claims_no_limit(
    url: str, address: str | None, port: int | None, pooled: bool
) -> None:
    reading = limits.interpret("postgresql", _pg_row(address, port), _endpoint(url))
    assert (reading.pooler is not None) == pooled
    assert reading.limit == (None if pooled else 97)


def test_reserved_connections_count_from_postgresql_16() -> None:
    endpoint = _endpoint("postgresql://u@127.0.0.1/d")
    row15 = (150000, 100, 3, None, False, -1, -1, "127.0.0.1", 5432, 5432)
    row16 = (160000, 100, 3, "5", False, -1, -1, "127.0.0.1", 5432, 5432)
    assert limits.interpret("postgresql", row15, endpoint).limit == 97
    assert limits.interpret("postgresql", row16, endpoint).limit == 92
    # A role limit below the slots wins; -2 (a database being dropped) is no limit.
    row16_role = (160000, 100, 3, "5", False, 12, -2, "127.0.0.1", 5432, 5432)
    assert limits.interpret("postgresql", row16_role, endpoint).limit == 12


def test_mysql_port_mismatch_is_a_proxy() -> None:
    direct = limits.interpret("mysql", (151, 0, 3306), _endpoint("mysql+pymysql://u@db/app"))
    assert direct.limit == 151 and direct.pooler is None
    through = limits.interpret("mysql", (151, 10, 3306), _endpoint("mysql+pymysql://u@proxysql:6033/app"))
    assert through.limit is None and through.pooler is not None
    assert limits.interpret("mariadb", (151, 10, 3306), _endpoint("mariadb+pymysql://u@db/app")).limit == 10
