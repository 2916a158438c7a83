"""The shipped dashboards with a driver pool: an app whose only pool is asyncpg's own, added in
FastAPI's lifespan as the how-to shows, run under uvicorn against PostgreSQL, driven for a few
seconds (concurrent requests that queue behind a pool of two, one acquire timeout), and scraped
every second by a real Prometheus. Then every panel query of every dashboard is evaluated for that
pool: each returns a series, except the queries reading a metric listed in ``NO_DATA_METRICS``
(a figure this run gives no cause for, or asyncpg cannot give: each with the reason), which must
return none."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import yaml

from tests.ports import free_port
from tests.test_operator_e2e import (
    Stack,
    _database,
    _process,
    _wait_until_ok,
)
from tests.test_operator_kit import ROOT, panel_queries, require_tool

JOB = "poolwatch-asyncpg"
POOL = "apg"
LOAD_SECONDS = 8
RATE_WINDOW = "30s"

APP = textwrap.dedent(
    """
    import asyncio
    import os
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    import asyncpg
    from fastapi import FastAPI

    import poolwatch


    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=2)
        watch.add(pool, name="apg")
        app.state.pool = pool
        try:
            yield
        finally:
            watch.remove(pool)
            await pool.close()


    app = FastAPI(lifespan=lifespan)
    watch = poolwatch.instrument(app)


    @app.get("/users/{user_id}")
    async def user(user_id: int) -> int:
        async with app.state.pool.acquire() as connection:
            await connection.fetchval("SELECT pg_sleep(0.02)")
            value: int = await connection.fetchval("SELECT $1::int", user_id)
            return value


    @app.get("/impatient")
    async def impatient() -> str:
        pool = app.state.pool
        try:
            connection = await pool.acquire(timeout=0.001)  # behind six queued callers: times out
        except asyncio.TimeoutError:
            return "timed out"
        # Not the acquire's timeout: asyncpg would give the release (its reset query) that budget.
        await pool.release(connection, timeout=10)
        return "served"
    """
)

# Metric -> why no panel query that reads it has a series for this asyncpg pool after this run. The
# test holds each reason to it: such a query must come back empty (else this list is stale).
NO_DATA_METRICS = {
    "poolwatch_threadpool_capacity": "an all-async app never runs anything in Starlette's thread "
    "pool, whose capacity is published once it has been used",
    "poolwatch_server_connections_max": "the server's connection limit is read for SQLAlchemy pools",
    "poolwatch_invalidations_total": "asyncpg has no invalidations",
    "poolwatch_checkouts_after_response_total": "no checkout starts after a response in this run",
    "poolwatch_query_errors_total": "no statement fails in this run",
    # What asyncpg cannot give is absent, never a made-up zero (AsyncpgSource.unavailable).
    "poolwatch_connections_overflow": "asyncpg's pool has no overflow",
    "poolwatch_pre_ping_failures_total": "asyncpg's pool has no pre-ping",
    "poolwatch_gc_reclaimed_total": "asyncpg never returns a lost connection through the collector",
    "poolwatch_idle_in_transaction_seconds": "transactions are not followed on driver pools",
    "poolwatch_held_after_response_seconds": "holds across a response are followed for SQLAlchemy only",
}


def _reads(expr: str, metric: str) -> bool:
    """Whether a query reads ``metric`` (a histogram through its _bucket, _sum or _count too)."""
    return re.search(rf"\b{metric}(_bucket|_sum|_count)?\b", expr) is not None


@pytest.fixture(scope="module")
def stack(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus_bin = require_tool("prometheus")
    work = tmp_path_factory.mktemp("asyncpg-dashboards")
    (work / "asyncpg_app.py").write_text(APP)
    app_port, prom_port = free_port(), free_port()
    instance = f"127.0.0.1:{app_port}"
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [instance]}]}],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus_args = [
        prometheus_bin,
        f"--config.file={work / 'prometheus.yml'}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        "--storage.tsdb.retention.time=1h",
    ]
    app_args = [sys.executable, "-m", "uvicorn", "asyncpg_app:app", "--app-dir", str(work)]
    app_args += ["--host", "127.0.0.1", "--port", str(app_port), "--no-access-log"]
    with _database(postgres_url) as database_url:
        env = {**os.environ, "DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        with (
            _process(app_args, work / "app.log", env) as app,
            _process(prometheus_args, work / "prometheus.log") as prometheus,
        ):
            base = f"http://{instance}"
            prom = f"http://127.0.0.1:{prom_port}"
            _wait_until_ok(f"{base}/health/live", app, work / "app.log", "the asyncpg app")
            _wait_until_ok(f"{prom}/-/ready", prometheus, work / "prometheus.log", "Prometheus")
            _wait_for_scrapes_of(prom, instance)
            _drive(base)
            stack = Stack(prometheus=prom, instance=instance, logs=work)
            # Wait until Prometheus has scraped the whole run, however slowly a loaded machine goes.
            done = f'poolwatch_timeouts_total{{job="{JOB}", pool="{POOL}", route="/impatient"}} > 0'
            deadline = time.monotonic() + 60
            while not stack.query(done).get("data", {}).get("result"):
                assert app.poll() is None, f"the app died:\n{stack.log_tail('app.log')}"
                assert time.monotonic() < deadline, (
                    f"the timeout was never scraped:\n{stack.log_tail('app.log')}"
                )
                time.sleep(0.5)
            yield stack


def _wait_for_scrapes_of(prometheus: str, instance: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    expr = f'up{{job="{JOB}", instance="{instance}"}} == 1'
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=5)
            if answer.json()["data"]["result"]:
                return
        time.sleep(0.5)
    pytest.fail(f"Prometheus never scraped the app at {instance}")


def _drive(base: str) -> None:
    """Eight clients asking for users for LOAD_SECONDS (they queue behind a pool of two), then
    impatient callers while the pool is busy until one times out."""
    stop = time.monotonic() + LOAD_SECONDS
    failures: list[str] = []

    timed_out = threading.Event()

    def client(number: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as http:
            # The load goes on until an impatient caller has timed out, however long that takes.
            while time.monotonic() < stop or not timed_out.is_set():
                answer = http.get(f"/users/{number}")
                if answer.status_code != 200 or answer.json() != number:
                    failures.append(f"{answer.status_code} {answer.text}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    give_up = time.monotonic() + LOAD_SECONDS + 60
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            while time.monotonic() < give_up and http.get("/impatient").json() != "timed out":
                pass
    finally:
        timed_out.set()
        for thread in threads:
            thread.join()
    assert not failures, failures[:5]


def substitute(expr: str, instance: str) -> str:
    values = {
        "job": JOB, "instance": instance, "pool": POOL,
        "__rate_interval": RATE_WINDOW, "__interval": "5s", "__range": "1m",
    }  # fmt: skip

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            pytest.fail(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


PANELS = panel_queries()


@pytest.mark.parametrize(
    ("uid", "title", "expr"), PANELS, ids=[f"{u}:{t}:{i}" for i, (u, t, _) in enumerate(PANELS)]
)
def test_panel_query_with_an_asyncpg_pool(stack: Stack, uid: str, title: str, expr: str) -> None:
    query = substitute(expr, stack.instance)
    answer = stack.query(query)
    assert answer.get("status") == "success", f"{uid} / {title}: invalid query {query!r}: {answer}"
    result = answer["data"]["result"]
    exempt = [metric for metric in NO_DATA_METRICS if _reads(expr, metric)]
    if exempt:
        assert not result, f"{uid} / {title}: {exempt} has data now; NO_DATA_METRICS is stale: {result}"
        return
    assert result, f"{uid} / {title}: no series for {query!r}.\napp:\n{stack.log_tail('app.log')}"


def test_the_asyncpg_pool_is_seen_queueing_and_timing_out(stack: Stack) -> None:
    """The figures the run was built to show, above zero (not only present)."""
    selector = f'job="{JOB}", pool="{POOL}"'
    for expr in (
        f"sum(poolwatch_checkouts_total{{{selector}}})",
        f"sum(poolwatch_checkouts_queued_total{{{selector}}})",
        f'sum(poolwatch_timeouts_total{{{selector}, route="/impatient"}})',
        f'sum(poolwatch_use_seconds_count{{{selector}, route="/users/{{user_id}}"}})',
        f'sum(poolwatch_query_seconds_count{{{selector}, operation="SELECT"}})',
        f'sum(poolwatch_pool_info{{{selector}, driver="asyncpg"}})',
    ):
        answer = stack.query(expr)
        assert answer["data"]["result"], expr
        assert float(answer["data"]["result"][0]["value"][1]) > 0, expr


def test_no_data_exceptions_name_metrics_the_panels_read() -> None:
    for metric in NO_DATA_METRICS:
        assert any(_reads(expr, metric) for _, _, expr in PANELS), metric
