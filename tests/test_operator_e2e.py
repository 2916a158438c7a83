"""The operator kit against real data: demo app + load generator + a real Prometheus.

The demo runs under uvicorn against PostgreSQL (a database of its own, dropped afterwards), the
load generator drives it for about 20 s, and Prometheus scrapes it every second with poolwatch's
alert rules loaded. Then every dashboard query and every alert expression is evaluated through
Prometheus' HTTP API: all must be valid PromQL, and every panel query must return a series.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import yaml

from tests.ports import free_port
from tests.test_operator_kit import (
    ROOT,
    RULES,
    load_rules,
    panel_queries,
    require_tool,
    variable_queries,
)

JOB = "poolwatch-demo"
POOL = "primary"
LOAD_SECONDS = 20
RATE_WINDOW = "30s"  # what Grafana's $__rate_interval stands for over the run's time range
LEAK_THRESHOLD_SECONDS = 2


@dataclass
class Stack:
    prometheus: str  # base URL
    instance: str  # the demo's host:port, as Prometheus labels it
    logs: Path

    def query(self, expr: str) -> dict[str, Any]:
        """An instant query; returns Prometheus' whole answer (status, data or error)."""
        response = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        return dict(response.json())

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.logs / name
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


@contextlib.contextmanager
def _database(admin_url: str) -> Iterator[str]:
    """A database of our own on the shared server: other suites use `test` at the same time."""
    name = f"poolwatch_e2e_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def _process(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=5)


def _wait_until_ok(
    url: str, process: subprocess.Popen[bytes], log: Path, what: str, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    pytest.fail(f"{what} did not answer {url} within {timeout} s:\n{log.read_text()[-3000:]}")


def _wait_for_scrapes(prometheus: str, instance: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    expr = f'up{{job="{JOB}", instance="{instance}"}} == 1'
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=5)
            if answer.json()["data"]["result"]:
                return
        time.sleep(0.5)
    pytest.fail(f"Prometheus never scraped the demo at {instance}")


@pytest.fixture(scope="module")
def stack(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus_bin = require_tool("prometheus")
    work = tmp_path_factory.mktemp("operator-e2e")
    app_port, prom_port = free_port(), free_port()
    instance = f"127.0.0.1:{app_port}"
    env = {
        **os.environ,
        "DEMO_MISBEHAVE": "true",
        "POOLWATCH_LEAK_THRESHOLD_SECONDS": str(LEAK_THRESHOLD_SECONDS),
        "POOLWATCH_SLOW_QUERY_SECONDS": "1.0",
        "PYTHONUNBUFFERED": "1",
    }
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
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
    app_args = [sys.executable, "-m", "uvicorn", "demo_app.main:app"]
    app_args += ["--host", "127.0.0.1", "--port", str(app_port), "--no-access-log"]
    with _database(postgres_url) as database_url:
        env["DATABASE_URL"] = database_url
        with (
            _process(app_args, work / "demo.log", env) as app,
            _process(prometheus_args, work / "prometheus.log") as prometheus,
        ):
            base = f"http://{instance}"
            prom = f"http://127.0.0.1:{prom_port}"
            _wait_until_ok(f"{base}/health/live", app, work / "demo.log", "the demo app")
            _wait_until_ok(f"{prom}/-/ready", prometheus, work / "prometheus.log", "Prometheus")
            _wait_for_scrapes(prom, instance)
            load_args = [sys.executable, "-m", "demo_app.load", "--url", base, "--quiet"]
            load_args += ["--duration", str(LOAD_SECONDS), "--concurrency", "8", "--seed", "7"]
            load = subprocess.run(
                load_args,
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=LOAD_SECONDS + 60,
            )
            assert load.returncode == 0, f"load generator failed:\n{load.stdout}\n{load.stderr}"
            (work / "load.log").write_text(load.stdout + load.stderr)
            stack = Stack(prometheus=prom, instance=instance, logs=work)
            # Background leaks outlive their requests: wait until Prometheus has scraped one,
            # however slowly a loaded machine gets there.
            leaks = f'sum(poolwatch_leaks_total{{job="{JOB}", pool="{POOL}", route=~".*leak"}}) > 0'
            deadline = time.monotonic() + 60
            while not stack.query(leaks).get("data", {}).get("result"):
                assert app.poll() is None, f"the demo app died:\n{(work / 'demo.log').read_text()}"
                assert time.monotonic() < deadline, (
                    f"no leak scraped within 60 s:\n{stack.log_tail('demo.log')}"
                )
                time.sleep(0.5)
            assert app.poll() is None, f"the demo app died:\n{(work / 'demo.log').read_text()}"
            yield stack


VARIABLES = {
    "job": JOB,
    "pool": POOL,
    "__rate_interval": RATE_WINDOW,
    "__interval": "5s",
    "__range": "1m",
}


def substitute(expr: str, instance: str) -> str:
    """Fill in Grafana's variables as a user would see them: the demo's job, instance and pool."""
    values = {**VARIABLES, "instance": instance}

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            pytest.fail(f"unknown dashboard variable ${name} in {expr!r}")
        # Unescaped, as Grafana sends a single value; "." in an address still matches itself.
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


PANELS = panel_queries()


@pytest.mark.parametrize(
    ("uid", "title", "expr"), PANELS, ids=[f"{u}:{t}:{i}" for i, (u, t, _) in enumerate(PANELS)]
)
def test_panel_query_returns_series(stack: Stack, uid: str, title: str, expr: str) -> None:
    query = substitute(expr, stack.instance)
    answer = stack.query(query)
    assert answer.get("status") == "success", f"{uid} / {title}: invalid query {query!r}: {answer}"
    result = answer["data"]["result"]
    assert result, (
        f"{uid} / {title}: no series for {query!r} after {LOAD_SECONDS} s of load.\n"
        f"load generator:\n{stack.log_tail('load.log')}"
    )


@pytest.mark.parametrize("rule", load_rules(), ids=lambda rule: rule["alert"])
def test_alert_expression_is_valid(stack: Stack, rule: dict[str, Any]) -> None:
    answer = stack.query(rule["expr"])
    assert answer.get("status") == "success", f"{rule['alert']}: {answer}"


def test_prometheus_evaluates_every_rule_without_error(stack: Stack) -> None:
    answer = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=10).json()
    rules = [rule for group in answer["data"]["groups"] for rule in group["rules"]]
    assert {rule["name"] for rule in rules} == {rule["alert"] for rule in load_rules()}
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"


def test_dashboard_variables_list_the_demo(stack: Stack) -> None:
    expected = {"job": JOB, "instance": stack.instance, "pool": POOL}
    for uid, name, query in variable_queries():
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
        assert match and match.group(2) == name, f"{uid}: ${name}: {query!r}"
        selector = substitute(match.group(1), stack.instance)
        answer = httpx.get(
            f"{stack.prometheus}/api/v1/label/{name}/values",
            params={"match[]": selector},
            timeout=10,
        ).json()
        assert answer["status"] == "success", f"{uid}: ${name}: {answer}"
        assert expected[name] in answer["data"], f"{uid}: ${name} offers {answer['data']}"


def _value(stack: Stack, expr: str) -> float:
    answer = stack.query(expr)
    assert answer.get("status") == "success", answer
    result = answer["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def test_the_misbehaviour_shows_up(stack: Stack) -> None:
    """The demo's bugs are visible in the data the dashboards and alerts read."""
    selector = f'job="{JOB}", pool="{POOL}"'
    checks = {
        # a background task held a connection past the 2 s threshold
        "leaks from /misbehave/leak": f'sum(poolwatch_leaks_total{{{selector}, route=~".*leak"}})',
        "slow queries (pg_sleep)": (
            f"sum(poolwatch_query_seconds_count{{{selector}}})"
            f' - sum(poolwatch_query_seconds_bucket{{{selector}, le="1.0"}})'
        ),
        "invalidations (dead connection)": f"sum(poolwatch_invalidations_total{{{selector}}})",
        "query errors": f"sum(poolwatch_query_errors_total{{{selector}}})",
        "checkouts after the response": (f"sum(poolwatch_checkouts_after_response_total{{{selector}}})"),
    }
    missing = {name: expr for name, expr in checks.items() if _value(stack, expr) <= 0}
    assert not missing, f"not visible in Prometheus: {missing}\n{stack.log_tail('load.log')}"
    # N+1: 21 statements for 20 users in one request (the load asks for 20).
    most = _value(
        stack,
        f'max(poolwatch_request_queries_sum{{job="{JOB}", route=~".*n-plus-one"}}'
        f' / poolwatch_request_queries_count{{job="{JOB}", route=~".*n-plus-one"}})',
    )
    assert most > 2, f"N+1 endpoint ran {most} statements per request on average"
    # The leak alert's own expression sees the leaking route.
    leak_rule = next(r for r in load_rules() if r["alert"] == "PoolWatchConnectionLeak")
    routes = {s["metric"].get("route") for s in stack.query(leak_rule["expr"])["data"]["result"]}
    assert any(route and route.endswith("leak") for route in routes), routes
