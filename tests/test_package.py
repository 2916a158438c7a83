"""The package as a user gets it: build the wheel and sdist, check them, install the wheel into a
clean virtualenv and run the quick start of docs/getting-started.md there.

Real tools all the way: ``python -m build`` (isolated build, hatchling from the package index),
``twine check --strict``, ``python -m venv`` and pip with its usual cache, so repeated runs download
nothing. The quick start runs with the repository off ``sys.path``: what it imports is the wheel.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.metrics import parse_text

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GETTING_STARTED = ROOT / "docs" / "getting-started.md"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
# What the quick start needs besides poolwatch: FastAPI, and httpx for starlette's TestClient.
QUICK_START_EXTRAS = ["fastapi", "httpx"]

DRIVER = """
import importlib.metadata
import json
import pathlib
import sys

from starlette.testclient import TestClient

import app  # the quick start, as written in docs/getting-started.md
import poolwatch

with TestClient(app.app) as client:
    time = client.get("/time")
    metrics = client.get("/metrics")
    live = client.get("/health/live")
app.engine.dispose()
print(json.dumps({
    "poolwatch_file": poolwatch.__file__,
    "py_typed": (pathlib.Path(poolwatch.__file__).parent / "py.typed").is_file(),
    "version": importlib.metadata.version("poolwatch"),
    "prefix": sys.prefix,
    "time": [time.status_code, time.json()],
    "live": live.status_code,
    "metrics": [metrics.status_code, metrics.headers["content-type"], metrics.text],
}))
"""


@dataclass
class Built:
    wheel: Path
    sdist: Path


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH would put a checkout (or the tests' own setup) ahead of what was installed.
    env = {key: value for key, value in os.environ.items() if key not in {"PYTHONPATH", "PYTHONHOME"}}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def quick_start_code() -> str:
    """The first Python block under docs/getting-started.md's "## Quick start" heading."""
    text = GETTING_STARTED.read_text()
    assert "## Quick start" in text, "docs/getting-started.md has no '## Quick start' section"
    section = text.split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "no ```python block under the Quick start"
    return match.group(1)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    out = tmp_path_factory.mktemp("dist")
    # The default: the sdist first, then the wheel built from the unpacked sdist, so a file the
    # sdist forgets breaks the wheel here rather than on a user's machine.
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], cwd=out)
    wheels = sorted(out.glob("*.whl"))
    sdists = sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return Built(wheel=wheels[0], sdist=sdists[0])


@pytest.fixture(scope="module")
def venv(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A clean virtualenv with the wheel, its runtime dependencies and the quick start's two."""
    root = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", str(root)], cwd=root)
    python = root / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--quiet", str(built.wheel), *QUICK_START_EXTRAS], cwd=root)
    yield python


def test_build_gives_a_wheel_and_an_sdist_that_twine_accepts(built: Built) -> None:
    assert built.wheel.name == f"poolwatch-{VERSION}-py3-none-any.whl"
    assert built.sdist.name == f"poolwatch-{VERSION}.tar.gz"
    result = _run(
        [sys.executable, "-m", "twine", "check", "--strict", str(built.wheel), str(built.sdist)], ROOT
    )
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_the_wheel_ships_py_typed_and_only_the_package(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(f"poolwatch-{VERSION}.dist-info/METADATA").decode()
        entry_points = wheel.read(f"poolwatch-{VERSION}.dist-info/entry_points.txt").decode()
    assert "poolwatch/py.typed" in names
    assert "poolwatch/__init__.py" in names and "poolwatch/gunicorn.py" in names
    # The live page is package data: served from the installed package, not from a checkout.
    assert "poolwatch/_serve/static/poolwatch.html" in names
    # The pytest plugin: installing the wheel is enough for pytest to find it.
    assert "poolwatch/pytest_plugin.py" in names
    assert "[pytest11]\npoolwatch = poolwatch.pytest_plugin" in entry_points, entry_points
    top_level = {name.split("/", 1)[0] for name in names}
    assert top_level == {"poolwatch", f"poolwatch-{VERSION}.dist-info"}, top_level
    # README is the long description, rendered as Markdown; every extra is declared.
    assert "Description-Content-Type: text/markdown" in metadata
    for extra in PYPROJECT["project"]["optional-dependencies"]:
        assert f"Provides-Extra: {extra}" in metadata, extra
    with tarfile.open(built.sdist) as sdist:
        members = set(sdist.getnames())
    for path in ("poolwatch/py.typed", "pyproject.toml", "README.md", "tests/test_package.py"):
        assert f"poolwatch-{VERSION}/{path}" in members, path


def test_the_wheel_runs_the_readme_quick_start_in_a_clean_venv(venv: Path, tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(quick_start_code())
    (tmp_path / "driver.py").write_text(DRIVER)
    result = _run([str(venv), "driver.py"], cwd=tmp_path, timeout=120)
    report = json.loads(result.stdout.strip().splitlines()[-1])

    # It ran the installed wheel, not this checkout.
    site_packages = Path(report["prefix"]).resolve()
    assert Path(report["poolwatch_file"]).resolve().is_relative_to(site_packages), report["poolwatch_file"]
    assert not Path(report["poolwatch_file"]).resolve().is_relative_to(ROOT)
    assert report["py_typed"] is True
    assert report["version"] == VERSION

    status, body = report["time"]
    assert status == 200 and body["time"], body
    assert report["live"] == 200
    status, content_type, text = report["metrics"]
    assert status == 200 and content_type.startswith("text/plain"), (status, content_type)
    samples = parse_text(text)
    pool = "quickstart.db"  # a SQLite pool is named after its file, as the URL gives it
    assert samples.value("poolwatch_checkouts_total", pool=pool) == 1  # GET /time, once
    assert samples.value("poolwatch_connections", pool=pool, state="used") == 0
    assert samples.value("poolwatch_request_queries_count", route="/time", method="GET") == 1
    assert samples.find("poolwatch_query_seconds_count", pool=pool, operation="SELECT")


def test_the_docs_name_every_extra() -> None:
    text = GETTING_STARTED.read_text()
    section = text.split("## Install", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `([a-z-]+)` \|", section, re.MULTILINE))
    assert rows == set(PYPROJECT["project"]["optional-dependencies"]), rows
