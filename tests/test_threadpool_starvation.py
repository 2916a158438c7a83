"""The sync-endpoint deadlock, for real: uvicorn, FastAPI, PostgreSQL and a real Prometheus.

tests/starvation_app.py has a sync ``yield`` session dependency, a sync sub-dependency that queries
(so the request holds its connection from then on) and a sync endpoint, a pool of one connection,
and 4 AnyIO thread tokens. Eight concurrent requests hang it: the threads holding the 4 tokens wait
in ``Pool.connect()`` for the connection held by a request that waits for a token. The test shows
the hang in poolwatch's metrics (served on the loop, which stays free), the starvation event in
the app's log, and the alert's own expression and rule state in Prometheus; then it releases the
hang through the app's async ``/release`` (more tokens) and every request completes.

Bounded: the pool_timeout (300 s) would end the hang on its own; every wait here has a deadline.
The alert needs two minutes without a checkin, so the test takes about two and a half minutes.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from poolwatch._settings import PoolWatchSettings
from tests.metrics import parse_text
from tests.ports import free_port
from tests.test_operator_e2e import _process, _wait_for_scrapes, _wait_until_ok
from tests.test_operator_kit import RULES, load_rules, require_tool

TOKENS = 4
REQUESTS = 8  # twice the tokens: more than enough to take every token while one holds the pool
POOL_TIMEOUT = 300
# The default (the app sets none): read from the class, not the environment.
STALL_SECONDS: float = PoolWatchSettings.model_fields["health_stall_seconds"].default
JOB = "poolwatch-demo"  # the job name _wait_for_scrapes looks for


def wait_for(what: str, check: Callable[[], Any], timeout: float, log: Path) -> Any:
    """Poll ``check`` until it returns something truthy; fail with the app's log after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            pytest.fail(f"{what} did not happen within {timeout} s; app log:\n{tail}")
        time.sleep(0.25)


@pytest.mark.timeout(420)
def test_sync_endpoint_deadlock_is_seen_logged_alerted_and_released(
    postgres_url: str, tmp_path: Path
) -> None:
    prometheus_bin = require_tool("prometheus")
    app_port, prom_port = free_port(), free_port()
    instance = f"127.0.0.1:{app_port}"
    base = f"http://{instance}"
    prom = f"http://127.0.0.1:{prom_port}"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "DATABASE_URL": postgres_url.replace("postgresql://", "postgresql+psycopg://", 1),
        "THREAD_TOKENS": str(TOKENS),
        "POOL_TIMEOUT": str(POOL_TIMEOUT),
    }
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [instance]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus_args = [
        prometheus_bin,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
    ]
    app_args = [sys.executable, "-m", "uvicorn", "tests.starvation_app:app"]
    app_args += ["--host", "127.0.0.1", "--port", str(app_port), "--no-access-log"]
    app_log = tmp_path / "app.log"
    rule = next(r for r in load_rules() if r["alert"] == "PoolWatchThreadpoolStarvation")

    def metrics() -> Any:
        return parse_text(httpx.get(f"{base}/metrics", timeout=10).text)

    def query(expr: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    with (
        _process(app_args, app_log, env) as app,
        _process(prometheus_args, tmp_path / "prometheus.log") as prometheus,
    ):
        _wait_until_ok(f"{base}/health/live", app, app_log, "the starvation app")
        _wait_until_ok(f"{prom}/-/ready", prometheus, tmp_path / "prometheus.log", "Prometheus")
        _wait_for_scrapes(prom, instance)

        # A healthy service first: requests one at a time return their connection.
        for _ in range(3):
            assert httpx.get(f"{base}/items", timeout=30).status_code == 200
        assert metrics().value("poolwatch_checkins_total", pool="primary") == 3
        assert metrics().value("poolwatch_threadpool_capacity") == TOKENS

        results: list[int | str] = []
        lock = threading.Lock()

        def call() -> None:
            try:
                status: int | str = httpx.get(f"{base}/items", timeout=POOL_TIMEOUT + 30).status_code
            except httpx.HTTPError as error:
                status = repr(error)
            with lock:
                results.append(status)

        callers = [threading.Thread(target=call, daemon=True) for _ in range(REQUESTS)]
        for caller in callers:
            caller.start()

        # The hang, in the app's own numbers, served from the (free) event loop meanwhile.
        def hung() -> Any:
            samples = metrics()
            full = samples.value("poolwatch_threadpool_threads", state="busy") == TOKENS
            waiting = samples.value("poolwatch_threadpool_threads", state="waiting") > 0
            pending = samples.value("poolwatch_pending_requests", pool="primary") > 0
            return samples if full and waiting and pending else None

        samples = wait_for("the hang", hung, 60, app_log)
        assert samples.value("poolwatch_connections", pool="primary", state="used") == 1
        assert samples.value("poolwatch_threadpool_capacity") == TOKENS
        # Health, also served on the loop. The first check has seen no progress yet (health checks
        # are what watch it): a full pool with callers queued is saturated, 200 "degraded" by
        # default. A check once the stall window (10 s by default) has passed with nothing moved
        # says down, 503; never before it.
        first_asked = time.monotonic()
        health = httpx.get(f"{base}/health/db", timeout=10)
        assert (health.status_code, health.json()) == (200, {"status": "degraded"})
        answers = []
        while time.monotonic() - first_asked < STALL_SECONDS + 50:
            time.sleep(1)
            health = httpx.get(f"{base}/health/db", timeout=10)
            answers.append((health.status_code, health.json()))
            if health.status_code != 200:
                break
        down_after = time.monotonic() - first_asked
        assert answers[-1] == (503, {"status": "down"}), answers
        assert all(answer == (200, {"status": "degraded"}) for answer in answers[:-1]), answers
        # The two checks that bracket the stall lie inside this measured span, so it cannot be
        # shorter than the window (a lower bound only: load can only make it longer).
        assert down_after >= STALL_SECONDS, down_after

        # The event, once, naming the route that holds the connection.
        def starvation_lines() -> list[str]:
            text = app_log.read_text(errors="replace")
            return [line for line in text.splitlines() if "poolwatch.threadpool_starvation" in line]

        (line,) = wait_for("the poolwatch.threadpool_starvation event", starvation_lines, 90, app_log)
        fields = dict(re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", line))
        assert fields["pool"] == "primary"
        assert fields["threads_busy"] == str(TOKENS) and fields["threads_capacity"] == str(TOKENS)
        assert int(fields["threads_waiting"]) > 0 and int(fields["callers_waiting"]) > 0
        assert fields["checked_out"] == "1"
        assert "'/items': 1" in fields["routes"]
        with lock:
            assert results == [], f"the service was not hung: {results}"

        # Prometheus: the alert's own expression names the pool once two minutes have passed
        # without a checkin, and the rule itself is pending (it fires after its `for`).
        def alert_expression() -> list[dict[str, Any]]:
            return [s for s in query(rule["expr"]) if s["metric"].get("pool") == "primary"]

        (series,) = wait_for("the alert expression", alert_expression, 200, app_log)
        assert series["metric"]["instance"] == instance
        assert float(series["value"][1]) > 0  # callers waiting

        def rule_state() -> str | None:
            alerts = httpx.get(f"{prom}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
            states = [a["state"] for a in alerts if a["labels"]["alertname"] == rule["alert"]]
            return states[0] if states else None

        assert wait_for("the rule to be pending", rule_state, 30, app_log) in {"pending", "firing"}
        assert len(starvation_lines()) == 1, "logged more than once in one episode"
        with lock:
            assert results == [], f"the hang ended on its own: {results}"

        # The way out: more tokens (an async endpoint needs none), and every request completes.
        answer = httpx.post(f"{base}/release", timeout=10)
        assert answer.status_code == 200, answer.text
        for caller in callers:
            caller.join(timeout=60)
        assert results == [200] * REQUESTS, results
        after = metrics()
        assert after.value("poolwatch_pending_requests", pool="primary") == 0
        assert after.value("poolwatch_threadpool_threads", state="waiting") == 0
        assert after.value("poolwatch_checkins_total", pool="primary") == 3 + REQUESTS
        assert app.poll() is None
