"""Free-threaded Python: poolwatch's lock-free counts rely on the GIL, so without it poolwatch
refuses to start, with a message saying how to run it, rather than count wrong."""

from __future__ import annotations

import subprocess
import sys

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

import poolwatch
from poolwatch._runtime import gil_enabled


def test_this_interpreter_has_the_gil() -> None:
    assert gil_enabled() is True


def test_without_the_gil_watch_and_instrument_refuse_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    # Forced: what sys._is_gil_enabled() answers on a 3.13t/3.14t build running without the GIL.
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)
    engine = sa.create_engine("sqlite://")
    with pytest.raises(RuntimeError, match=r"runs without the global interpreter lock .* \(PYTHON_GIL=1"):
        poolwatch.watch(engine, registry=CollectorRegistry())
    with pytest.raises(RuntimeError, match=r"free-threaded build"):
        poolwatch.instrument(Starlette(), engine, registry=CollectorRegistry())
    # Nothing was installed on the engine before the refusal.
    assert "connect" not in engine.pool.__dict__
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: True, raising=False)
    watch = poolwatch.watch(engine, registry=CollectorRegistry())
    watch.close()


def test_the_supported_versions_are_declared() -> None:
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())[
        "project"
    ]
    assert project["requires-python"] == ">=3.11"
    versions = [c for c in project["classifiers"] if c.startswith("Programming Language :: Python :: 3.")]
    assert versions == [f"Programming Language :: Python :: 3.{minor}" for minor in (11, 12, 13, 14)]


def test_a_subprocess_sees_the_refusal_through_the_environment_too() -> None:
    code = (
        "import sys; sys._is_gil_enabled = lambda: False\n"
        "import sqlalchemy as sa, poolwatch\n"
        "from prometheus_client import CollectorRegistry\n"
        "try:\n"
        "    poolwatch.watch(sa.create_engine('sqlite://'), registry=CollectorRegistry())\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.startswith("poolwatch: this Python runs without the global interpreter lock")
