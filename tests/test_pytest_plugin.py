"""The pytest plugin, as a user meets it: real test modules run by pytest against real PostgreSQL.

Each test writes a small FastAPI app and a test module into a fresh directory and runs pytest on
them in a subprocess (``pytester.runpytest_subprocess``), so the plugin is found the way a user's
suite finds it: through the ``pytest11`` entry point of the installed package.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

# The guard's how-to page: its complete test module is run here, on PostgreSQL.
GUARD_PAGE = Path(__file__).resolve().parent.parent / "docs" / "how-to" / "test-guard.md"

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = session
asyncio_default_test_loop_scope = session
"""

# A shop whose endpoints return their connection, keep it, drop it, or run an N+1. The engine is
# module-level: no test hands it to the guard.
SHOP_APP = """
import os
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text

import poolwatch

engine = create_engine(os.environ["GUARD_SYNC_URL"], pool_size=5)
app = FastAPI()
if os.environ.get("GUARD_MIDDLEWARE") == "1":
    poolwatch.instrument(app, engine, registry=CollectorRegistry())
kept: list[Any] = []


@app.get("/clean")
def clean() -> dict[str, int]:
    with engine.connect() as connection:
        return {"one": connection.execute(text("SELECT 1")).scalar_one()}


@app.get("/leak")
def leak() -> dict[str, str]:
    connection = engine.connect()  # LEAK-SITE
    kept.append(connection)
    return {"status": "kept"}


@app.get("/dropped")
def dropped() -> dict[str, str]:
    connection = engine.connect()  # DROP-SITE
    connection.execute(text("SELECT 1"))
    return {"status": "never closed: the garbage collector returns it"}


@app.get("/authors")
def authors() -> list[dict[str, int]]:
    with engine.connect() as connection:
        ids = connection.execute(
            text("SELECT g FROM generate_series(1, 5) AS g WHERE 'secret-literal' <> ''")
        ).scalars().all()
        return [
            {"id": i, "books": connection.execute(
                text("SELECT count(*) FROM pg_class WHERE relpages > :n"), {"n": i}
            ).scalar_one()}
            for i in ids
        ]
"""

SHOP_TESTS = """
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event
from sqlalchemy.pool import Pool

from shop_app import app, kept


def test_clean_endpoint(poolwatch_guard):
    assert TestClient(app).get("/clean").json() == {"one": 1}


def test_leaking_endpoint(poolwatch_guard):
    assert TestClient(app).get("/leak").status_code == 200


def test_dropped_connection(poolwatch_guard):
    assert TestClient(app).get("/dropped").status_code == 200


def test_fails_on_its_own(poolwatch_guard):
    TestClient(app).get("/leak")
    assert 1 + 1 == 3, "the test's own failure"


@pytest.mark.xfail(reason="a known failure", strict=True)
def test_expected_to_fail(poolwatch_guard):
    TestClient(app).get("/leak")
    assert 1 + 1 == 3


@pytest.mark.max_queries(3)
def test_n_plus_one():
    assert len(TestClient(app).get("/authors").json()) == 5


@pytest.mark.max_queries(6)
def test_n_plus_one_within_its_budget(poolwatch_guard):
    assert len(TestClient(app).get("/authors").json()) == 5


@pytest.fixture
def session():
    # Lazy: the test body's first statement takes the connection, which is returned only when this
    # fixture is torn down, after the test.
    from sqlalchemy.orm import Session
    from shop_app import engine
    from sqlalchemy import text
    with Session(engine) as session:
        session.execute(text("SELECT 1"))
        session.execute(text("SELECT 2"))
        session.commit()
        yield session


@pytest.mark.max_queries(1)
def test_a_fixture_may_hold_its_connection_until_teardown(session, poolwatch_guard):
    from sqlalchemy import text
    assert session.execute(text("SELECT 3")).scalar_one() == 3  # the fixture's two are not counted


def test_a_first_connect_is_not_counted():
    import os
    import poolwatch
    from sqlalchemy import create_engine, text
    fresh = create_engine(os.environ["GUARD_SYNC_URL"])
    with poolwatch.assert_queries(1), fresh.connect() as connection:
        connection.execute(text("SELECT 1"))
    fresh.dispose()


def poolwatch_listeners(target, events):
    found = []
    for name in events:
        for owner, listeners in getattr(target.dispatch, name)._clslevel.items():
            found += [(owner.__name__, name, fn) for fn in listeners if fn.__module__.startswith("poolwatch")]
    return found


def test_zz_listeners_are_removed():
    for connection in kept:
        connection.close()
    assert poolwatch_listeners(Pool, Pool.dispatch._event_names) == []
    assert poolwatch_listeners(Engine, Engine.dispatch._event_names) == []
    assert Engine.__dict__["_has_events"] is False
"""

ASYNC_APP = """
import os
from typing import Any

from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

engine = create_async_engine(os.environ["GUARD_ASYNC_URL"], pool_size=5)
other = create_async_engine(os.environ["GUARD_ASYNC_URL"], pool_size=5)
app = FastAPI()
kept: list[Any] = []


@app.get("/clean")
async def clean() -> dict[str, int]:
    async with engine.connect() as connection:
        return {"one": (await connection.execute(text("SELECT 1"))).scalar_one()}


@app.get("/leak")
async def leak() -> dict[str, str]:
    connection = await engine.connect()  # ASYNC-LEAK-SITE
    kept.append(connection)
    return {"status": "kept"}


@app.get("/other-leak")
async def other_leak() -> dict[str, str]:
    kept.append(await other.connect())
    return {"status": "kept"}


@app.get("/other-count")
async def other_count() -> int:
    async with other.connect() as connection:
        for n in range(3):
            await connection.execute(text("SELECT :n * 2"), {"n": n})
    return 3


@app.get("/authors")
async def authors() -> list[int]:
    async with engine.connect() as connection:
        ids = (await connection.execute(text("SELECT g FROM generate_series(1, 4) AS g"))).scalars().all()
        return [
            (await connection.execute(text("SELECT :n + 1"), {"n": i})).scalar_one()
            for i in ids
        ]
"""

ASYNC_TESTS = """
import httpx
import prometheus_client
import pytest

import poolwatch
from async_app import app, engine

METRIC_NAMES = {metric.name for metric in prometheus_client.REGISTRY.collect()}


def client():
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shop")


async def test_clean_endpoint(poolwatch_guard):
    async with client() as http:
        assert (await http.get("/clean")).json() == {"one": 1}


async def test_leaking_endpoint(poolwatch_guard):
    async with client() as http:
        assert (await http.get("/leak")).status_code == 200


async def test_only_the_given_engine_is_guarded(poolwatch_guard):
    poolwatch_guard.only(engine)
    async with client() as http:
        assert (await http.get("/other-leak")).status_code == 200


@pytest.mark.max_queries(2)
async def test_n_plus_one(poolwatch_guard):
    poolwatch_guard.only(engine)
    async with client() as http:
        assert len((await http.get("/authors")).json()) == 4
        assert (await http.get("/other-count")).json() == 3  # another engine's statements: not in the budget


async def test_exact_budget_of_one_engine():
    async with client() as http:
        with poolwatch.assert_queries(5, engine) as log:
            await http.get("/authors")
    assert log.count == 5


def test_zz_default_registry_untouched():
    assert {metric.name for metric in prometheus_client.REGISTRY.collect()} == METRIC_NAMES
"""


@pytest.fixture
def shop(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, postgres_url: str) -> pytest.Pytester:
    monkeypatch.setenv("GUARD_SYNC_URL", postgres_url.replace("postgresql://", "postgresql+psycopg://", 1))
    monkeypatch.setenv("GUARD_ASYNC_URL", postgres_url.replace("postgresql://", "postgresql+asyncpg://", 1))
    pytester.makeini(INI)
    pytester.makepyfile(shop_app=SHOP_APP, test_shop=SHOP_TESTS)
    return pytester


def line_of(source: str, marker: str) -> int:
    """The line of ``source`` holding ``marker``, as pytest writes the module (stripped first)."""
    lines = source.strip().splitlines()
    return next(number for number, line in enumerate(lines, 1) if marker in line)


def section(output: str, title: str) -> str:
    """The part of pytest's report under the ``___ title ___`` header."""
    match = re.search(rf"_+ {re.escape(title)} _+\n(.*?)(?=\n_{{3,}} |\n={{3,}} )", output, re.DOTALL)
    assert match is not None, f"no section {title!r} in:\n{output}"
    return match.group(1)


def test_leaks_fail_with_their_borrow_site_and_route_and_clean_tests_pass(
    shop: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GUARD_MIDDLEWARE", "1")
    result = shop.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers", "-rA")
    output = result.stdout.str()
    # A leak is an error at the test's teardown, after its call phase passed: both are counted.
    result.assert_outcomes(passed=7, failed=2, errors=2, xfailed=1)

    leak = section(output, "ERROR at teardown of test_leaking_endpoint")
    leak_line = line_of(SHOP_APP, "LEAK-SITE")
    assert "poolwatch_guard: 1 connection still checked out at the end of the test:" in leak
    assert f"taken at shop_app.py:{leak_line} in leak, route GET /leak (pool 127.0.0.1:5432/" in leak

    dropped = section(output, "ERROR at teardown of test_dropped_connection")
    drop_line = line_of(SHOP_APP, "DROP-SITE")
    assert "1 connection never returned, reclaimed by the garbage collector:" in dropped
    assert f"taken at shop_app.py:{drop_line} in dropped, route GET /dropped" in dropped

    # A test that fails on its own is reported as it failed, with no leak report on top.
    own = section(output, "test_fails_on_its_own")
    assert "AssertionError: the test's own failure" in own
    assert "ERROR at teardown of test_fails_on_its_own" not in output
    assert "ERROR at teardown of test_expected_to_fail" not in output

    # The N+1: the repeated statement, counted, first; literals never shown.
    budget = section(output, "test_n_plus_one")
    assert "@pytest.mark.max_queries(3): expected at most 3 statements, 6 ran:" in budget
    lines = [line.strip() for line in budget.splitlines() if "×" in line]
    assert lines == [
        "5 × SELECT count(*) FROM pg_class WHERE relpages > ?   [GET /authors]",
        "1 × SELECT g FROM generate_series(?, ...) AS g WHERE ? <> ?   [GET /authors]",
    ]
    assert "secret-literal" not in output
    assert re.search(r"PASSED test_shop.py::test_clean_endpoint", output)
    for name in ("test_a_fixture_may_hold_its_connection_until_teardown", "test_a_first_connect_is_not_counted",
                 "test_zz_listeners_are_removed"):  # fmt: skip
        assert f"PASSED test_shop.py::{name}" in output
    assert "ERROR at teardown of test_a_fixture_may_hold_its_connection_until_teardown" not in output


def test_async_engine_with_httpx_asgi_transport(shop: pytest.Pytester) -> None:
    shop.makepyfile(async_app=ASYNC_APP, test_async=ASYNC_TESTS)
    result = shop.runpytest_subprocess("-p", "no:cacheprovider", "-rA", "test_async.py")
    output = result.stdout.str()
    result.assert_outcomes(passed=5, failed=1, errors=1)

    leak = section(output, "ERROR at teardown of test_leaking_endpoint")
    # No middleware here: the borrow site alone, found across SQLAlchemy's greenlet.
    assert (
        f"taken at async_app.py:{line_of(ASYNC_APP, 'ASYNC-LEAK-SITE')} in leak (pool 127.0.0.1:5432/" in leak
    )
    assert "route" not in leak

    budget = section(output, "test_n_plus_one")
    assert "expected at most 2 statements, 5 ran:" in budget
    lines = [line.strip() for line in budget.splitlines() if "×" in line]
    assert lines == ["4 × SELECT ? + ?", "1 × SELECT g FROM generate_series(?, ...) AS g"]
    for name in ("test_clean_endpoint", "test_only_the_given_engine_is_guarded",
                 "test_exact_budget_of_one_engine", "test_zz_default_registry_untouched"):  # fmt: skip
        assert f"PASSED test_async.py::{name}" in output


def test_under_xdist_with_two_workers_and_no_middleware(shop: pytest.Pytester) -> None:
    result = shop.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "-rA", "test_shop.py")
    output = result.stdout.str()
    result.assert_outcomes(passed=7, failed=2, errors=2, xfailed=1)
    assert "created: 2/2 workers" in output
    leak = section(output, "ERROR at teardown of test_leaking_endpoint")
    assert f"taken at shop_app.py:{line_of(SHOP_APP, 'LEAK-SITE')} in leak (pool 127.0.0.1:5432/" in leak
    budget = section(output, "test_n_plus_one")
    assert "5 × SELECT count(*) FROM pg_class WHERE relpages > ?" in budget


PLAIN_SUITE = """
import sys


def test_the_plugin_is_loaded_and_nothing_behind_it():
    assert "poolwatch.pytest_plugin" in sys.modules
    heavy = ("poolwatch", "sqlalchemy", "prometheus_client", "structlog", "pydantic")
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in heavy)
    assert loaded == ["poolwatch", "poolwatch.pytest_plugin"]
"""


def import_microseconds(stderr: str, names: set[str]) -> int:
    """Cumulative import time of ``names`` from ``python -X importtime`` output."""
    total = 0
    for line in stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)$", line)
        if match and match.group(4) in names:
            total += int(match.group(2))
    return total


def test_inert_for_a_suite_that_does_not_use_it(pytester: pytest.Pytester) -> None:
    # Loaded through the entry point, with nothing of poolwatch's behind it (see PLAIN_SUITE).
    pytester.makeini(INI)
    pytester.makepyfile(test_plain=PLAIN_SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)

    # What loading it costs at pytest start, when pytest itself is loaded already. (pytest loads
    # entry points with importlib, which ``-X importtime`` does not report, so the plugin is
    # imported the way pytest's own import leaves the interpreter: after ``import pytest``.)
    measured = pytester.run(
        sys.executable, "-X", "importtime", "-c", "import pytest; import poolwatch.pytest_plugin"
    )
    assert measured.ret == 0
    cost = import_microseconds(measured.stderr.str(), {"poolwatch", "poolwatch.pytest_plugin"})
    print(f"importing poolwatch.pytest_plugin after pytest: {cost} us")
    assert 0 < cost < 20_000


def python_blocks_under(markdown: str, heading: str) -> list[str]:
    """The ```python blocks of one section (up to the next heading of the same level)."""
    level = heading.split(" ")[0]
    start = markdown.index(heading + "\n")
    rest = markdown[start + len(heading) :]
    end = re.search(rf"^{level} ", rest, re.MULTILINE)
    body = rest[: end.start()] if end else rest
    return re.findall(r"^```python\n(.*?)^```$", body, re.DOTALL | re.MULTILINE)


def test_the_readme_example_runs_as_written(pytester: pytest.Pytester, postgres_url: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("DATABASE_URL", postgres_url.replace("postgresql://", "postgresql+psycopg://", 1))
    (example,) = python_blocks_under(GUARD_PAGE.read_text(), "## A complete test module")
    pytester.makeini(INI)
    pytester.makepyfile(test_example=example)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=5)
