"""``/health/db`` is what starts the read of the server's connection limit (in the background, never
in the answer's way): before the first check the limit is absent, after it the limit of the pool's
role and database appears, read on one of the pool's idle connections (it needs two: see
``_capture/capacity/reader.py``)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

import poolwatch
from tests.metrics import scrape
from tests.test_server_limit import pg_client_limit


@pytest.fixture
def engine(sync_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sync_url, pool_size=2, max_overflow=0)
    yield engine
    engine.dispose()


def _limit(registry: CollectorRegistry) -> list[float]:
    return [value for _, value in scrape(registry).find("poolwatch_server_connections_max", pool="lim")]


def test_the_first_health_check_starts_the_read_of_the_servers_limit(
    engine: sa.Engine, postgres_url: str, registry: CollectorRegistry
) -> None:
    app = FastAPI()
    watch = poolwatch.instrument(app, engine, registry=registry, name="lim")
    try:
        with TestClient(app) as client:
            with engine.connect(), engine.connect():
                pass  # two idle connections: the read may take one
            client.get("/metrics")  # a scrape does not start it
            assert _limit(registry) == []
            assert client.get("/health/db").json() == {"status": "ok"}
            give_up = time.monotonic() + 30
            while not _limit(registry):
                assert time.monotonic() < give_up, "the limit was never read"
                time.sleep(0.05)
        assert _limit(registry) == [pg_client_limit(postgres_url)]
    finally:
        watch.close()
