"""The slow-query event against the real PostgreSQL: no literal gets out, value lists collapse (12.7).

Before issue 11/12, a long value list made sqlparse give up, and its fallback kept tagged dollar
quotes and comments: a canary reached the ``poolwatch.slow_query`` event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import create_async_engine
from structlog.testing import capture_logs

import poolwatch

CANARY = "KQXJCANARY"
SLEEP_SECONDS = 0.1


def slow_query_events(events: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [event for event in events if event["event"] == "poolwatch.slow_query"]


def test_literals_in_every_quoting_form_stay_out_of_the_slow_query_event(
    sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0)
    watch = poolwatch.watch(engine, registry=registry, name="sync", slow_query_seconds=SLEEP_SECONDS / 2)
    # 15,000 literals: far past the 10,000 tokens where sqlparse gave up.
    values = ", ".join(str(7_000_000 + n) for n in range(15_000))
    statement = f"""
        SELECT pg_sleep({SLEEP_SECONDS}), '{CANARY}_single ''quoted''' AS a, E'{CANARY}_e\\n' AS b,
               U&'{CANARY}_u' AS c, $${CANARY}_dollar$$ AS d, $tag${CANARY}_tag 'x' $$ $tag$ AS e,
               B'0101' AS f, X'CAFE' AS g, 31415926 AS h, 2.718e0 AS i /* {CANARY}_block */
        FROM (SELECT 1 AS id) s -- {CANARY}_line
        WHERE s.id NOT IN ({values})
    """
    try:
        with capture_logs() as events, engine.connect() as connection:
            row = connection.exec_driver_sql(statement).one()
        assert row.a == f"{CANARY}_single 'quoted'" and row.e == f"{CANARY}_tag 'x' $$ "  # it really ran
        [event] = slow_query_events(events)
        assert (
            event["pool"] == "sync" and event["operation"] == "SELECT" and event["seconds"] >= SLEEP_SECONDS
        )
        for secret in (CANARY, "7000000", "7014999", "CAFE", "0101", "31415926", "2.718"):
            assert secret not in repr(event), (secret, event)
        assert event["fingerprint"] == (
            "SELECT pg_sleep(?), ? AS a, ? AS b, ? AS c, ? AS d, ? AS e, ? AS f, ? AS g, ? AS h, ? AS i "
            "FROM (SELECT ? AS id) s WHERE s.id NOT IN (?, ...)"
        )
    finally:
        watch.close()
        engine.dispose()


async def test_fifteen_thousand_bound_parameters_collapse_in_the_slow_query_event(
    async_url: str, registry: CollectorRegistry
) -> None:
    engine = create_async_engine(async_url, pool_size=1, max_overflow=0)
    watch = poolwatch.watch(engine, registry=registry, slow_query_seconds=SLEEP_SECONDS / 2)
    query = sa.text(
        "SELECT pg_sleep(:pause) FROM (SELECT 1 AS id) s WHERE s.id NOT IN :ids AND :email <> ''"
    ).bindparams(sa.bindparam("ids", expanding=True))
    parameters = {"pause": SLEEP_SECONDS, "ids": list(range(7_000_000, 7_015_000)), "email": CANARY}
    try:
        with capture_logs() as events:
            async with engine.connect() as connection:
                await connection.execute(query, parameters)
        [event] = slow_query_events(events)
        assert CANARY not in repr(event) and "7000000" not in repr(event)
        assert event["fingerprint"] == (
            "SELECT pg_sleep(?) FROM (SELECT ? AS id) s WHERE s.id NOT IN (?, ...) AND ? <> ?"
        )
    finally:
        watch.close()
        await engine.dispose()
