"""``queries_p95`` on the live page is a number of statements some request really ran.

Interpolated inside the exported power-of-two buckets and rounded up, routes that always run 3, 0
and about 21 statements read 4, 1 and 32. Real app, real SQLite file, real requests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

import poolwatch
from poolwatch._record.histogram import COUNT_BUCKETS, HistogramCopy
from poolwatch._record.requests import EXACT_COUNTS_UP_TO
from poolwatch._serve.state import count_quantile
from tests.metrics import scrape


def _run(engine: sa.Engine, statements: int) -> None:
    with engine.connect() as connection:
        for number in range(statements):
            connection.exec_driver_sql(f"SELECT {number}")


def test_queries_p95_is_exact_for_small_counts(tmp_path: Path, registry: CollectorRegistry) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    app = FastAPI()
    calls = {"about": 0}

    @app.get("/three")
    def three() -> dict[str, int]:
        _run(engine, 3)
        return {}

    @app.get("/none")
    def none() -> dict[str, int]:
        return {}

    @app.get("/about-21")
    def about_21() -> dict[str, int]:
        calls["about"] += 1
        _run(engine, (20, 21, 22)[calls["about"] % 3])
        return {}

    poolwatch.instrument(app, engine, registry=registry, name="main", ui="always")
    try:
        with TestClient(app) as client:
            for _ in range(30):
                for path in ("/three", "/none", "/about-21"):
                    assert client.get(path).status_code == 200
            routes = {row["route"]: row for row in client.get("/poolwatch/state").json()["routes_by_queries"]}
    finally:
        engine.dispose()
    samples = scrape(registry)

    def per_request(route: str) -> float:
        total = samples.value("poolwatch_request_queries_sum", route=route, method="GET")
        count = samples.value("poolwatch_request_queries_count", route=route, method="GET")
        return float(total / count)

    # What the exported histogram counts, request by request, is what the page reads exactly.
    assert per_request("/three") == 3 and routes["/three"]["queries_p95"] == 3
    assert per_request("/none") == 0 and routes["/none"]["queries_p95"] == 0
    assert per_request("/about-21") == 21 and routes["/about-21"]["queries_p95"] == 22
    assert routes["/about-21"]["requests"] == 30


def _copy(values: list[int]) -> tuple[HistogramCopy, list[int]]:
    counts = [0] * (len(COUNT_BUCKETS) + 1)
    exact = [0] * (EXACT_COUNTS_UP_TO + 1)
    for value in values:
        index = next((i for i, bound in enumerate(COUNT_BUCKETS) if value <= bound), len(COUNT_BUCKETS))
        counts[index] += 1
        if value <= EXACT_COUNTS_UP_TO:
            exact[value] += 1
    return HistogramCopy(COUNT_BUCKETS, counts, float(sum(values))), exact


@pytest.mark.parametrize(
    ("values", "p95"),
    [
        ([3] * 20, 3),
        ([0] * 20, 0),
        ([1] * 19 + [9], 1),  # 19 of 20 is exactly 95 %
        ([1] * 18 + [9, 9], 9),
        ([5] * 100 + [70], 5),
        (list(range(1, 101)), 95),
        ([7], 7),  # one request: its own count, not an interpolation in (4, 8]
        ([2, 6], 6),
    ],
)
def test_count_quantile_is_the_nearest_rank(values: list[int], p95: int) -> None:
    assert count_quantile(0.95, *_copy(values)) == p95


def test_the_median_is_the_first_rank_at_or_past_half() -> None:
    assert count_quantile(0.5, *_copy([1, 5])) == 1
    assert count_quantile(0.5, *_copy([1, 5, 9])) == 5
    assert count_quantile(0.0, *_copy([4, 5])) == 4  # the smallest rank is the first


def test_past_the_exact_counts_the_buckets_answer() -> None:
    copy, exact = _copy([500] * 20)
    # In (256, 512], interpolated and rounded up, as before: the exact counts cannot say.
    assert count_quantile(0.95, copy, exact) == 500
    assert count_quantile(0.95, *_copy([])) is None


def test_the_exported_bucket_layout_is_unchanged() -> None:
    # Dashboards read poolwatch_request_queries with histogram_quantile: its le labels stay.
    assert COUNT_BUCKETS == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
