"""The public API as a type checker sees it: settings are typed keywords, so a misspelt or mistyped
setting fails in mypy, not only at start-up. Runs mypy (strict) over code written the way users call
poolwatch; the package is taken from this checkout (MYPYPATH)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mypy import api

ROOT = Path(__file__).resolve().parent.parent

USER_CODE = """
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import create_async_engine

import poolwatch
from poolwatch import PoolWatch, PoolWatchMiddleware

engine = sa.create_engine("sqlite://")
other = create_async_engine("sqlite+aiosqlite://")
app = FastAPI()
"""

GOOD = """
app.add_middleware(PoolWatchMiddleware, engines=[engine], leak_threshold_seconds=5, health_details="token",
                   health_token="t")
watch: PoolWatch = poolwatch.watch(engine, {"replica": other}, slow_query_seconds=0.5, multiproc_dir="/tmp/x")
watch.add(other, name="again")
poolwatch.instrument(app, engine, metrics_path=None, health_saturated_status=200, metrics_port=9100)
PoolWatch([engine, [other]], name=None, tracing=True).close()
poolwatch.watch({"primary": engine, "replica": other}, [engine, other], (other,))
"""

# (code, what mypy must say about it)
BAD = [
    (
        "poolwatch.watch(engine, leak_treshold_seconds=5)",
        'Unexpected keyword argument "leak_treshold_seconds"',
    ),
    ('poolwatch.instrument(app, engine, health_details="sometimes")', 'Argument "health_details"'),
    ("app.add_middleware(PoolWatchMiddleware, engines=[engine], slow_query_secs=1)", '"slow_query_secs"'),
    ('PoolWatch([engine], metrics_port="9100")', 'Argument "metrics_port"'),
    ('poolwatch.watch("postgresql://")', 'Argument 1 to "watch" has incompatible type "str"'),
]


@pytest.fixture(scope="module")
def mypy_output(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One mypy run over the good calls followed by the bad ones, one a line."""
    directory = tmp_path_factory.mktemp("typing")
    path = directory / "user_code.py"
    path.write_text(USER_CODE + GOOD + "\n".join(code for code, _ in BAD) + "\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MYPYPATH", str(ROOT))
        stdout, stderr, _ = api.run(["--strict", "--cache-dir", str(directory / "cache"), str(path)])
    return stdout + stderr


def _errors(output: str) -> dict[int, list[str]]:
    errors: dict[int, list[str]] = {}
    for line, message in re.findall(r"user_code\.py:(\d+): error: (.*)", output):
        errors.setdefault(int(line), []).append(message)
    return errors


FIRST_BAD_LINE = (USER_CODE + GOOD).count("\n") + 1


def test_the_public_api_type_checks_as_users_call_it(mypy_output: str) -> None:
    good = {line: messages for line, messages in _errors(mypy_output).items() if line < FIRST_BAD_LINE}
    assert not good, mypy_output


def test_a_misspelt_or_mistyped_setting_fails_in_mypy(mypy_output: str) -> None:
    errors = _errors(mypy_output)
    for offset, (code, expected) in enumerate(BAD):
        found = errors.get(FIRST_BAD_LINE + offset, [])
        assert any(expected in message for message in found), (code, found, mypy_output)
