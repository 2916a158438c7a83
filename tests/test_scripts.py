"""README's commands as a user runs them: polite set-up, a demo that installs once, PORT and --port.

The scripts run for real in a copy of the checkout, with a fresh ``.venv`` made by ``setup.sh``
itself (pip from the package index, with its usual cache). Commands that must never run on a user's
machine (stopping services, killing processes, and apt-get for the demo) are put first on PATH as
recorders, so a script that calls one is caught without anything being stopped or installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
# What the demo needs from a checkout (the rest of the tree plays no part in installing or serving).
CHECKOUT = ["pyproject.toml", "README.md", "poolwatch", "demo_app", "scripts"]
RECORDED = ["apt-get", "apt", "dpkg", "sudo", "service", "systemctl", "invoke-rc.d", "pkill", "killall"]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("checkout")
    for name in CHECKOUT:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__", "*.db"))
        else:
            shutil.copy2(source, copy / name)
    return copy


@pytest.fixture(scope="module")
def recorder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a bin directory of recorders, the file they record their calls in)."""
    bin_dir = tmp_path_factory.mktemp("recorders")
    calls = bin_dir / "calls.log"
    calls.touch()
    for name in RECORDED:
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 0\n')
        script.chmod(0o755)
    return bin_dir, calls


def _env(recorder: tuple[Path, Path], tmp: Path, **extra: str) -> dict[str, str]:
    env = {
        key: value for key, value in os.environ.items() if key not in {"PYTHONPATH", "VIRTUAL_ENV", "PORT"}
    }
    # Not the tests' own virtualenv: python3 is whatever the machine has, as for a user.
    path = [
        p
        for p in env.get("PATH", "").split(os.pathsep)
        if Path(p).resolve() != Path(sys.prefix, "bin").resolve()
    ]
    env["PATH"] = os.pathsep.join([str(recorder[0]), *path])
    env["DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp / 'demo.db'}"
    env.update(extra)
    return env


@contextlib.contextmanager
def _demo(
    checkout: Path, env: dict[str, str], args: list[str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["bash", "scripts/demo.sh", *args], cwd=checkout, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


def _wait_serving(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:
    """Until the demo answers on ``port``; the first start installs, so allow for pip."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the demo exited with {process.returncode}:\n{log.read_text()}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    pytest.fail(f"the demo did not answer on port {port} within {timeout} s:\n{log.read_text()}")


def _installed_files(checkout: Path) -> dict[str, int]:
    """poolwatch's own install record in .venv, by modification time: pip rewrites it on each install."""
    site = next((checkout / ".venv" / "lib").glob("python3.*/site-packages"))
    return {str(path): path.stat().st_mtime_ns for path in site.glob("poolwatch-*.dist-info/*")}


def _has_module(checkout: Path, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([str(checkout / ".venv/bin/python"), "-c", code], check=False).returncode == 0


def test_demo_installs_its_extra_once_and_honours_port(
    checkout: Path, recorder: tuple[Path, Path], tmp_path: Path
) -> None:
    first_port, second_port = free_port(), free_port()
    env = _env(recorder, tmp_path, PORT=str(first_port))

    log = tmp_path / "first.log"
    with _demo(checkout, env, [], log) as process:
        _wait_serving(first_port, process, log)
    first = log.read_text()
    assert "setup: installing poolwatch with its 'demo' extra" in first, first
    assert "Debian" not in first and "apt-get" not in first, first
    # The demo's extra only: the dev tool chain stays out of a demo install.
    assert _has_module(checkout, "uvicorn") and _has_module(checkout, "aiosqlite")
    assert not _has_module(checkout, "pytest") and not _has_module(checkout, "mypy")
    installed = _installed_files(checkout)
    assert installed, "poolwatch is not installed in the checkout's .venv"

    # Started again: nothing is installed, and --port wins over PORT.
    log = tmp_path / "second.log"
    with _demo(checkout, env, ["--port", str(second_port)], log) as process:
        _wait_serving(second_port, process, log, timeout=60)
    second = log.read_text()
    assert "setup:" not in second, second
    assert _installed_files(checkout) == installed, "pip ran again on the second start"
    assert f"127.0.0.1:{second_port}" in second

    calls = recorder[1].read_text()
    assert calls == "", f"the demo ran commands it must never run:\n{calls}"


def test_setup_for_tests_stops_no_service_and_kills_no_process(
    checkout: Path, recorder: tuple[Path, Path], tmp_path: Path
) -> None:
    venv_python = checkout / ".venv" / "bin" / "python"
    if not venv_python.exists():  # this test alone: a venv without pip is enough here
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(checkout / ".venv")], check=True)
    # As if the dev extra were installed for this pyproject.toml: setup's pip step is skipped.
    digest = subprocess.run(
        ["sha256sum", "pyproject.toml"], cwd=checkout, capture_output=True, text=True, check=True
    ).stdout.split()[0]
    (checkout / ".venv" / ".poolwatch-setup-dev").write_text(digest + "\n")
    recorder[1].write_text("")

    result = subprocess.run(
        ["bash", "scripts/setup.sh", "test"], cwd=checkout, env=_env(recorder, tmp_path),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    calls = recorder[1].read_text().splitlines()
    forbidden = [
        call
        for call in calls
        if call.split()[0] in {"service", "systemctl", "invoke-rc.d", "pkill", "killall"}
    ]
    assert not forbidden, f"setup.sh stopped services or killed processes: {forbidden}"
    # What it says and installs when a tool is missing: test_setup_installs_a_missing_tool_and_says_so.


def _path_without(tools: set[str], recorder: tuple[Path, Path], tmp: Path, *, uid: str = "") -> str:
    """A PATH that finds every command the machine has except ``tools``, the recorders first.

    The machine's own directories are left out of it (promtool lives beside bash in /usr/bin), so
    one directory of links stands in for them. ``uid`` makes ``id -u`` print that number.
    """
    shadow = tmp / "shadow-bin"
    shadow.mkdir()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not directory or not Path(directory).is_dir() or Path(directory) == recorder[0]:
            continue
        for entry in Path(directory).iterdir():
            target = shadow / entry.name
            if entry.name in tools or target.exists() or target.is_symlink():
                continue
            if entry.is_file() and os.access(entry, os.X_OK):
                target.symlink_to(entry)
    if uid:
        (shadow / "id").unlink(missing_ok=True)
        (shadow / "id").write_text(f"#!/bin/sh\necho {uid}\n")
        (shadow / "id").chmod(0o755)
    return os.pathsep.join([str(recorder[0]), str(shadow)])


def _setup_with_path(
    checkout: Path, recorder: tuple[Path, Path], tmp: Path, path: str
) -> subprocess.CompletedProcess[str]:
    venv_python = checkout / ".venv" / "bin" / "python"
    if not venv_python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(checkout / ".venv")], check=True)
    digest = subprocess.run(
        ["sha256sum", "pyproject.toml"], cwd=checkout, capture_output=True, text=True, check=True
    ).stdout.split()[0]
    (checkout / ".venv" / ".poolwatch-setup-dev").write_text(digest + "\n")
    recorder[1].write_text("")
    env = {**_env(recorder, tmp), "PATH": path}
    return subprocess.run(
        ["bash", "scripts/setup.sh", "test"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_setup_installs_a_missing_tool_and_says_so(
    checkout: Path, recorder: tuple[Path, Path], tmp_path: Path
) -> None:
    # promtool and prometheus missing, as root with apt-get (a recorder: nothing is installed).
    path = _path_without({"promtool", "prometheus"}, recorder, tmp_path)
    result = _setup_with_path(checkout, recorder, tmp_path, path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "setup: installing the Debian package the tests need: prometheus (for promtool and prometheus)"
        in result.stdout.splitlines()
    ), result.stdout
    apt = [call for call in recorder[1].read_text().splitlines() if call.startswith("apt-get")]
    # Only prometheus: the other tools (pgbouncer, chromium, chromedriver) are on this PATH.
    assert apt == ["apt-get update -qq", "apt-get install -y -qq --no-install-recommends prometheus"], apt


def test_setup_without_root_names_the_missing_package_and_installs_nothing(
    checkout: Path, recorder: tuple[Path, Path], tmp_path: Path
) -> None:
    path = _path_without({"promtool", "prometheus"}, recorder, tmp_path, uid="1000")
    result = _setup_with_path(checkout, recorder, tmp_path, path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "setup: installing" not in result.stdout
    assert (
        "setup: the tests need Debian's prometheus package (promtool, prometheus) and it is missing;"
        " install it with: apt-get install --no-install-recommends prometheus"
    ) in result.stderr, result.stderr
    assert recorder[1].read_text() == ""


def test_a_bad_port_is_refused_naming_port(tmp_path: Path) -> None:
    env = {**os.environ, "PORT": "eighty"}
    result = subprocess.run(
        [sys.executable, "-m", "demo_app"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "--port or PORT" in result.stderr and "'eighty'" in result.stderr
