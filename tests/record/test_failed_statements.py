"""Failed statements count in their checkout's statement count and time, found by the connection's
record, or by its proxy for pools that share one record between checkouts (StaticPool)."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import poolwatch
from poolwatch._serve.state import StateBuilder


def _row(watch: poolwatch.PoolWatch) -> dict[str, object]:
    recorders = list(zip(watch.pool_names, watch.recorders, strict=True))
    (pool,) = json.loads(StateBuilder().build(recorders, None))["pools"]
    (values,) = pool["connections"]
    return dict(zip(pool["connection_fields"], values, strict=True))


@pytest.mark.parametrize("pool", ["QueuePool", "StaticPool"])
def test_failed_statements_count_in_their_checkout(
    sync_url: str, registry: CollectorRegistry, pool: str
) -> None:
    engine = (
        sa.create_engine("sqlite://", poolclass=sa.pool.StaticPool)
        if pool == "StaticPool"
        else sa.create_engine(sync_url, pool_size=1)
    )
    watch = poolwatch.watch(engine, registry=registry, name="failing")
    (recorder,) = watch.recorders
    try:
        with engine.connect() as connection:
            for _ in range(2):
                with pytest.raises(sa.exc.DBAPIError):
                    connection.execute(sa.text("SELECT * FROM no_such_table_failed_statements"))
                connection.rollback()
            connection.execute(sa.text("SELECT 1"))
            row = _row(watch)
            assert row["statements"] == 3
        assert sum(recorder.query_errors.values()) == 2
    finally:
        watch.close()
        engine.dispose()
