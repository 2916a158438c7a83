"""Test harness: a real PostgreSQL, a CollectorRegistry per test, and a check that nothing leaks.

The server is found in this order: POOLWATCH_TEST_DATABASE_URL; a server on 127.0.0.1:5432; a
throwaway cluster started from the machine's PostgreSQL binaries (as the ``postgres`` user when the
suite runs as root); otherwise the run fails saying how to get one.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import psycopg
import pytest
from prometheus_client import CollectorRegistry

from tests.metrics import scrape
from tests.ports import free_port

HOW_TO_GET_ONE = (
    "poolwatch's tests need PostgreSQL: set POOLWATCH_TEST_DATABASE_URL="
    "postgresql://user@host:port/db, run a server on 127.0.0.1:5432 with trust auth, or install "
    "the PostgreSQL server binaries (Debian: apt-get install postgresql) so the suite can start one."
)


def _reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3) as connection:
            connection.execute("SELECT 1")
        return True
    except Exception:
        return False


@contextlib.contextmanager
def _throwaway_cluster() -> Iterator[str]:
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not binaries:
        pytest.exit(HOW_TO_GET_ONE, returncode=3)
    bindir = binaries[-1]
    data = tempfile.mkdtemp(prefix="poolwatch-pg-")
    port = free_port()
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(data, "postgres", "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_postgres, f"{bindir}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c max_connections=300"
    subprocess.run(
        [*as_postgres, f"{bindir}/pg_ctl", "-D", data, "-o", options, "-w", "start",
         "-l", f"{data}/server.log"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_postgres, f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A libpq-style URL (postgresql://...) of a server the suite may use."""
    explicit = os.environ.get("POOLWATCH_TEST_DATABASE_URL")
    if explicit:
        plain = explicit.replace("+asyncpg", "").replace("+psycopg", "")
        if not _reachable(plain):
            pytest.exit(f"POOLWATCH_TEST_DATABASE_URL is set but unreachable. {HOW_TO_GET_ONE}", 3)
        yield plain
        return
    local = "postgresql://postgres@127.0.0.1:5432/test"
    if _reachable(local):
        yield local
        return
    with _throwaway_cluster() as url:
        if not _reachable(url):
            pytest.exit(HOW_TO_GET_ONE, returncode=3)
        yield url


@pytest.fixture
def sync_url(postgres_url: str) -> str:
    return postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture
def async_url(postgres_url: str) -> str:
    return postgres_url.replace("postgresql://", "postgresql+asyncpg://", 1)


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    """A CollectorRegistry of the test's own; afterwards no pool in it may hold a connection."""
    registry = CollectorRegistry()
    yield registry
    # Connections dropped by the test are returned by the garbage collector, not by luck.
    deadline = time.monotonic() + 10
    while True:
        used = {
            labels["pool"]: value
            for (name, labels), value in scrape(registry).items()
            if name == "poolwatch_connections" and labels.get("state") == "used"
        }
        if not any(used.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not any(used.values()), f"test left connections checked out: {used}"
