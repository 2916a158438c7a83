"""The test guard fails a test that leaks a connection of asyncpg's or psycopg_pool's own pool.

Those pools have no class-level events; the guard reads the checkout tables of the driver pools
poolwatch watches. Real pytest runs in a subprocess, as a user's suite finds the plugin.
"""

from __future__ import annotations

import pytest

from tests.test_pytest_plugin import INI, line_of, section

pytest_plugins = ("pytester",)

DRIVER_TESTS = """
import os

import asyncpg
import psycopg_pool
from prometheus_client import CollectorRegistry

import poolwatch

URL = os.environ["GUARD_PG_URL"]
kept = []


async def test_asyncpg_leak(poolwatch_guard):
    pool = await asyncpg.create_pool(URL, min_size=1, max_size=2)
    watch = poolwatch.watch(pool, registry=CollectorRegistry(), name="apg")
    connection = await pool.acquire()  # APG-LEAK
    kept.append((watch, pool, connection))


async def test_asyncpg_returned(poolwatch_guard):
    pool = await asyncpg.create_pool(URL, min_size=1, max_size=2)
    watch = poolwatch.watch(pool, registry=CollectorRegistry(), name="apg2")
    async with pool.acquire() as connection:
        await connection.fetchval("SELECT 1")
    watch.close()
    await pool.close()


def test_psycopg_leak(poolwatch_guard):
    pool = psycopg_pool.ConnectionPool(URL, min_size=1, max_size=2, open=True)
    watch = poolwatch.watch(pool, registry=CollectorRegistry(), name="psy")
    connection = pool.getconn()  # PSY-LEAK
    kept.append((watch, pool, connection))


def test_psycopg_returned(poolwatch_guard):
    with psycopg_pool.ConnectionPool(URL, min_size=1, max_size=2, open=True) as pool:
        watch = poolwatch.watch(pool, registry=CollectorRegistry(), name="psy2")
        with pool.connection() as connection:
            connection.execute("SELECT 1")
        watch.close()


async def test_only_another_pool_is_guarded(poolwatch_guard):
    pool = await asyncpg.create_pool(URL, min_size=1, max_size=2)
    other = await asyncpg.create_pool(URL, min_size=1, max_size=1)
    watch = poolwatch.watch({"held": pool, "other": other}, registry=CollectorRegistry())
    poolwatch_guard.only(other)
    connection = await pool.acquire()
    kept.append((watch, pool, connection))
    await other.close()


async def test_zz_release_the_kept_ones():
    for watch, pool, connection in kept:
        watch.close()
        if isinstance(pool, asyncpg.Pool):
            await pool.release(connection)
            await pool.close()
        else:
            pool.putconn(connection)
            pool.close()
"""


def test_a_leak_of_a_watched_driver_pool_fails_its_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, postgres_url: str
) -> None:
    monkeypatch.setenv("GUARD_PG_URL", postgres_url)
    pytester.makeini(INI)
    pytester.makepyfile(test_drivers=DRIVER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    output = result.stdout.str()
    result.assert_outcomes(passed=6, errors=2)
    leak = section(output, "ERROR at teardown of test_asyncpg_leak")
    assert "poolwatch_guard: 1 connection still checked out at the end of the test:" in leak
    site = f"test_drivers.py:{line_of(DRIVER_TESTS, 'APG-LEAK')}"
    assert f"taken at {site} in test_asyncpg_leak (pool apg)" in leak
    leak = section(output, "ERROR at teardown of test_psycopg_leak")
    site = f"test_drivers.py:{line_of(DRIVER_TESTS, 'PSY-LEAK')}"
    assert f"taken at {site} in test_psycopg_leak (pool psy)" in leak
    # A leak from an earlier test is not the next test's; returned connections pass; a pool left
    # out by only() is not looked at.
    for clean in ("test_asyncpg_returned", "test_psycopg_returned", "test_only_another_pool_is_guarded"):
        assert f"ERROR at teardown of {clean}" not in output
