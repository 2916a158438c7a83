"""A test suite that patches the dialect (SQLAlchemy's own ResetAgentTest does, with
``mock.patch.object(engine.dialect, "do_rollback")``) sees every call it would see without poolwatch:
poolwatch's commit/rollback wrappers, put on the dialect once a transaction is seen, never replace
a patch someone else put there."""

from __future__ import annotations

from unittest import mock

import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import poolwatch


def rollbacks_seen(url: str, watched: bool) -> int:
    engine = sa.create_engine(url)
    watch = poolwatch.watch(engine, registry=CollectorRegistry()) if watched else None
    try:
        with mock.patch.object(engine.dialect, "do_rollback", wraps=engine.dialect.do_rollback) as rollback:
            for _ in range(3):
                with engine.connect() as connection:  # the SELECT leaves a transaction open
                    connection.execute(sa.text("SELECT 1"))
            return rollback.call_count
    finally:
        if watch is not None:
            watch.close()
        engine.dispose()


def test_a_patched_do_rollback_sees_the_same_calls_watched_or_not(sync_url: str) -> None:
    plain = rollbacks_seen(sync_url, watched=False)
    # One rollback as each connection closes its transaction, and SQLAlchemy's own on first connect.
    assert plain == 4
    assert rollbacks_seen(sync_url, watched=True) == plain
