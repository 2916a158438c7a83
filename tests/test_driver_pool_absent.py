"""A figure a pool library cannot give is absent from /metrics, never a made-up zero (asyncpg has no
overflow, neither library pre-pings or hands a lost connection back through the garbage collector,
and transactions and holds across a response are followed on SQLAlchemy's pools only)."""

from __future__ import annotations

import asyncpg  # type: ignore[import-untyped]
import psycopg_pool
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import poolwatch
from tests.metrics import scrape

DRIVER_ABSENT = {
    "poolwatch_pre_ping_failures_total",
    "poolwatch_connections_pinging",
    "poolwatch_gc_reclaimed_total",
    "poolwatch_idle_in_transaction_seconds_count",
    "poolwatch_held_after_response_seconds_count",
}


def names_for(registry: CollectorRegistry, pool: str) -> set[str]:
    return {name for (name, labels) in scrape(registry) if dict(labels).get("pool") == pool}


async def test_asyncpg_leaves_out_what_it_cannot_give(postgres_url: str, registry: CollectorRegistry) -> None:
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=2)
    watch = poolwatch.watch(pool, registry=registry, name="apg")
    try:
        async with pool.acquire() as connection:
            await connection.fetchval("SELECT 1")
        names = names_for(registry, "apg")
        assert "poolwatch_checkouts_total" in names and "poolwatch_use_seconds_count" in names
        assert names & (DRIVER_ABSENT | {"poolwatch_connections_overflow"}) == set()
    finally:
        watch.close()
        await pool.close()


def test_psycopg_pool_leaves_out_what_it_cannot_give(postgres_url: str, registry: CollectorRegistry) -> None:
    pool = psycopg_pool.ConnectionPool(postgres_url, min_size=1, max_size=2, open=True)
    watch = poolwatch.watch(pool, registry=registry, name="pg")
    try:
        with pool.connection() as connection:
            connection.execute("SELECT 1")
        names = names_for(registry, "pg")
        assert "poolwatch_checkouts_total" in names and "poolwatch_connections_overflow" in names
        assert names & DRIVER_ABSENT == set()
    finally:
        watch.close()
        pool.close()


@pytest.mark.parametrize("family", sorted(DRIVER_ABSENT | {"poolwatch_connections_overflow"}))
def test_a_sqlalchemy_pool_gives_every_one_of_them(
    family: str, sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_pre_ping=True)
    watch = poolwatch.watch({"sa": engine}, registry=registry)
    try:
        assert family in names_for(registry, "sa")
    finally:
        watch.close()
        engine.dispose()
