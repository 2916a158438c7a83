"""The demo as a showcase: no input and no race gives a server error.

- schemathesis (a property-based fuzzer) reads the demo's OpenAPI schema and sends what it generates,
  in every phase (boundary values, random data, stateful sequences that follow created ids), to the
  demo under a real uvicorn, on SQLite and on PostgreSQL. uvicorn's own access log is the count:
  every request it answered, and not one 5xx.
- The demo's load generator with its ``races`` mix (every worker writes and deletes the same few
  rows) ends each race in 404 or 409, never 500.
- What a newcomer meets: ids beyond the column's range, nulls in a PATCH, a taken address, the
  start-up message, a leak shown within a minute, a Ctrl-C that stops the demo in seconds.

Set ``DEMO_FUZZ_SEED`` to replay a run (schemathesis prints its seed).
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.exc import IntegrityError

from demo_app.errors import client_errors, constraint_name
from demo_app.main import create_app
from demo_app.settings import DemoSettings
from tests.metrics import parse_text
from tests.ports import free_port
from tests.test_operator_e2e import _database, _process, _wait_until_ok

with warnings.catch_warnings():  # starlette's nudge towards httpx2, not ours to act on
    warnings.simplefilter("ignore")
    from fastapi import HTTPException
    from starlette.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent
ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})')
# Every deliberate wait of the misbehaving endpoints capped at this, so the fuzzer can try their
# largest values in a fraction of a second (demo_app/misbehave.py: DEMO_MAX_SLEEP_SECONDS).
MAX_SLEEP = "0.2"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}"
        return
    postgres_url: str = request.getfixturevalue("postgres_url")
    with _database(postgres_url) as url:
        yield url


def _demo_env(database_url: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("POOLWATCH_")}
    env.update(DATABASE_URL=database_url, DEMO_MISBEHAVE="true", PYTHONUNBUFFERED="1", **extra)
    return env


def _statuses(access_log: Path) -> Counter[int]:
    return Counter(int(m["status"]) for m in ACCESS_LINE.finditer(access_log.read_text(errors="replace")))


def test_the_fuzzer_finds_no_server_error(database_url: str, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "demo.log"
    env = _demo_env(database_url, DEMO_MAX_SLEEP_SECONDS=MAX_SLEEP)
    server = [sys.executable, "-m", "uvicorn", "demo_app.main:app", "--host", "127.0.0.1"]
    server += ["--port", str(port), "--timeout-graceful-shutdown", "2"]
    fuzzer = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{base}/openapi.json"]
    fuzzer += ["--checks", "not_a_server_error", "--max-examples", "40", "--request-timeout", "20"]
    fuzzer += ["--no-color"]
    seed = os.environ.get("DEMO_FUZZ_SEED")
    if seed:
        fuzzer += ["--seed", seed]
    with _process(server, log, env) as app:
        _wait_until_ok(f"{base}/health/live", app, log, "the demo")
        result = subprocess.run(fuzzer, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
        assert app.poll() is None, f"the demo died under the fuzzer:\n{log.read_text()[-3000:]}"
    statuses = _statuses(log)
    answered = sum(statuses.values())
    server_errors = {status: n for status, n in statuses.items() if status >= 500}
    cases = re.search(r"(\d+) generated", result.stdout)
    print(
        f"\nschemathesis on {database_url.split(':', 1)[0]}: {cases[1] if cases else '?'} test cases, "
        f"{answered} requests answered, {sum(server_errors.values())} server errors; "
        f"statuses {dict(sorted(statuses.items()))}"
    )
    assert result.returncode == 0, f"schemathesis found a failure:\n{result.stdout[-6000:]}\n{result.stderr}"
    assert answered >= 500, f"too few requests reached the demo: {statuses}\n{result.stdout[-3000:]}"
    assert not server_errors, f"the demo answered 5xx: {server_errors}\n{log.read_text()[-3000:]}"
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text()[-3000:]


def test_races_under_the_load_generator_end_in_404_or_409(database_url: str, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "demo.log"
    env = _demo_env(database_url)
    server = [sys.executable, "-m", "uvicorn", "demo_app.main:app", "--host", "127.0.0.1"]
    server += ["--port", str(port), "--timeout-graceful-shutdown", "2"]
    load = [sys.executable, "-m", "demo_app.load", "--url", base, "--mix", "races", "--quiet"]
    load += ["--concurrency", "16", "--duration", "15", "--misbehave-ratio", "0", "--seed", "5"]
    load += ["--fail-on-server-error"]
    with _process(server, log, env) as app:
        _wait_until_ok(f"{base}/health/live", app, log, "the demo")
        result = subprocess.run(load, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    statuses = _statuses(log)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{log.read_text()[-3000:]}"
    # The races happened: rows vanished under writes (404) or addresses collided (409).
    assert statuses[404] + statuses[409] > 0, statuses
    assert not [s for s in statuses if s >= 500 and s != 503], statuses  # 503: /health/db only
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text()[-3000:]


# -- in-process: what a newcomer tries by hand --------------------------------------------------


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = DemoSettings(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}")  # type: ignore[call-arg]
    with TestClient(create_app(settings, CollectorRegistry())) as client:
        yield client


def test_ids_beyond_the_column_are_refused_not_a_server_error(client: TestClient) -> None:
    for path in ("/users/99999999999999999999999", "/users/1/posts/99999999999999999999999"):
        assert client.get(path).status_code in (404, 422), path
    assert client.get("/users/2147483648").status_code == 422
    assert client.get("/users", params={"offset": 10**30}).status_code == 422
    assert client.delete("/users/99999999999999999999999").status_code == 422


def test_a_patch_may_leave_fields_out_but_not_set_them_null(client: TestClient) -> None:
    user = client.post("/users", json={"email": "a@example.com", "name": "A"}).json()
    post = client.post(f"/users/{user['id']}/posts", json={"title": "t"}).json()
    assert client.patch(f"/users/{user['id']}", json={"name": None}).status_code == 422
    assert client.patch(f"/users/{user['id']}", json={"email": None}).status_code == 422
    for body in ({"title": None}, {"body": None}, {"title": None, "body": None}):
        assert client.patch(f"/users/{user['id']}/posts/{post['id']}", json=body).status_code == 422
    renamed = client.patch(f"/users/{user['id']}", json={"name": "B"})
    assert renamed.status_code == 200 and renamed.json()["name"] == "B"
    assert client.patch(f"/users/{user['id']}/posts/{post['id']}", json={}).status_code == 200


def test_text_the_database_cannot_store_is_refused(client: TestClient) -> None:
    user = client.post("/users", json={"email": "n@example.com", "name": "N"}).json()
    # JSON escapes, as a client sends them: a NUL, and a lone surrogate (valid JSON, not Unicode).
    for title in ('"a\\u0000b"', '"\\ud800"'):
        body = '{"title": ' + title + "}"
        answer = client.post(
            f"/users/{user['id']}/posts", content=body, headers={"content-type": "application/json"}
        )
        assert answer.status_code == 422, (body, answer.text)


def test_a_taken_address_is_409_and_a_deleted_user_404(client: TestClient) -> None:
    first = client.post("/users", json={"email": "x@example.com", "name": "X"}).json()
    second = client.post("/users", json={"email": "y@example.com", "name": "Y"}).json()
    taken = client.post("/users", json={"email": "x@example.com", "name": "again"})
    assert taken.status_code == 409 and taken.json()["detail"] == "email already registered"
    assert client.patch(f"/users/{second['id']}", json={"email": "x@example.com"}).status_code == 409
    assert client.delete(f"/users/{first['id']}").status_code == 204
    assert client.delete(f"/users/{first['id']}").status_code == 404
    assert client.patch(f"/users/{first['id']}", json={"name": "gone"}).status_code == 404


async def test_integrity_errors_are_mapped_by_constraint_not_by_class() -> None:
    def integrity_error(schema: str, insert: str) -> IntegrityError:
        connection = sqlite3.connect(":memory:")
        connection.executescript(schema)
        try:
            connection.execute(insert)
        except sqlite3.IntegrityError as error:
            return IntegrityError(insert, None, error)
        finally:
            connection.close()
        raise AssertionError("the insert succeeded")

    unique = integrity_error(
        "CREATE TABLE users (email TEXT); CREATE UNIQUE INDEX ix ON users (email);"
        "INSERT INTO users VALUES ('a');",
        "INSERT INTO users VALUES ('a')",
    )
    not_null = integrity_error("CREATE TABLE users (email TEXT NOT NULL);", "INSERT INTO users VALUES (NULL)")
    assert constraint_name(unique) == "users.email"
    assert constraint_name(not_null) is None
    with pytest.raises(HTTPException) as conflict:
        async with client_errors("user not found"):
            raise unique
    assert conflict.value.status_code == 409
    # Not every IntegrityError is a taken address: one the table does not name stays an error.
    with pytest.raises(IntegrityError):
        async with client_errors("user not found"):
            raise not_null


# -- the demo as a person starts and stops it ---------------------------------------------------


def test_the_demo_says_where_to_look_shows_a_leak_soon_and_stops_in_seconds(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "demo.log"
    env = _demo_env(f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}")
    with _process([sys.executable, "-m", "demo_app", "--port", str(port)], log, env) as demo:
        _wait_until_ok(f"{base}/health/live", demo, log, "the demo")
        said = log.read_text()
        for where in ("/docs", "/poolwatch", "/metrics", "/health/db"):
            assert f"{base}{where}" in said, said
        assert httpx.post(f"{base}/misbehave/leak").status_code == 202
        deadline = time.monotonic() + 60  # the promise: a leak within a minute
        leaks = 0.0
        while time.monotonic() < deadline and leaks < 1:
            samples = parse_text(httpx.get(f"{base}/metrics").text)
            leaks = samples.total("poolwatch_leaks_total", route="/misbehave/leak")
            time.sleep(0.5)
        assert leaks >= 1, "no leak counted within a minute of POST /misbehave/leak"
        # A request in flight that would hold on for 30 s, and Ctrl-C.
        holder = threading.Thread(
            target=lambda: httpx.get(f"{base}/misbehave/hold", params={"seconds": 30}, timeout=60),
            daemon=True,
        )
        holder.start()
        time.sleep(1)
        started = time.monotonic()
        demo.send_signal(signal.SIGINT)
        demo.wait(timeout=60)
        took = time.monotonic() - started
    # Far from both answers: about 2 s now, 30 s or more when shutdown waits for the hold.
    assert took < 15, f"the demo took {took:.1f} s to stop:\n{log.read_text()[-2000:]}"
