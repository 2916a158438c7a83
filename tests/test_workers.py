"""Multi-worker servers without the shared directory: one warning at start-up, naming the setting.

Real servers (uvicorn, gunicorn with uvicorn's worker class, ``fastapi run``) on a free loopback
port, serving a tiny FastAPI app that instruments an embedded SQLite engine and logs through plain
stdlib ``logging``. Each app process prints a marker once poolwatch is set up, so the tests wait for
every worker to have started, then read what the server printed. The markers are files, one per
process, not lines on the shared output: two processes printing at once can splice their lines. The warning comes once per worker
process (each worker decides for itself; they share nothing at start-up).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import poolwatch
from poolwatch._log import internal_errors
from poolwatch._serve import workers as _workers
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
EVENT = "poolwatch.multiworker_without_directory"
WARNING = re.compile(rf"^WARNING poolwatch (\d+) {re.escape(EVENT)} (.*)$", re.MULTILINE)

APP = """
import logging
import os

import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

import poolwatch

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(process)d %(message)s")
engine = sa.create_engine("sqlite:///" + os.environ["APP_DB"])
app = FastAPI()
poolwatch.instrument(app, engine, name="app")
# A second PoolWatch in the same process: still one warning per process.
poolwatch.watch(sa.create_engine("sqlite://"), registry=CollectorRegistry(), name="other")
# The marker is a file of its own: lines printed by two workers at once can be spliced together.
open(os.path.join(os.environ["LOADED_DIR"], str(os.getpid())), "w").close()
"""

# What `fastapi run --workers N` does underneath, with the count given in code instead.
SERVE = """
import os
import uvicorn

if __name__ == "__main__":  # workers are spawned, and a spawned process imports __main__ again
    uvicorn.run("app:app", host="127.0.0.1", port=int(os.environ["PORT"]), workers=2, log_level="info")
"""


@dataclass
class Started:
    output: str
    server_pid: int  # the process started: the supervisor, or the only server process
    loaded: set[int]  # processes that imported the app
    warnings: dict[int, str]  # pid -> the rest of the warning line


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is not installed beside {sys.executable} (the dev extra brings it)"
    return str(path)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[object]:
    processes: list[subprocess.Popen[bytes]] = []
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "serve.py").write_text(SERVE)

    def run(kind: str, workers: int, extra_env: dict[str, str] | None = None, loads: int = 0) -> Started:
        """Start a server and wait until ``loads`` (default: ``workers``) processes imported the app."""
        port = free_port()
        commands = {
            "uvicorn": [sys.executable, "-m", "uvicorn", "--workers", str(workers), "--host", "127.0.0.1",
                        "--port", str(port), "app:app"],
            "gunicorn": [sys.executable, "-m", "gunicorn", "-w", str(workers), "-k", "uvicorn.workers.UvicornWorker",
                         "-b", f"127.0.0.1:{port}", "app:app"],
            "fastapi": [_bin("fastapi"), "run", "--workers", str(workers), "--host", "127.0.0.1", "--port",
                        str(port), "app.py"],
            "uvicorn-no-flag": [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port),
                                "app:app"],
            "uvicorn.run": [sys.executable, "serve.py"],
        }  # fmt: skip
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]),
            "PYTHONUNBUFFERED": "1",
            "APP_DB": str(tmp_path / f"{kind}.db"),
            "PORT": str(port),
            **(extra_env or {}),
        }
        for name in ("POOLWATCH_MULTIPROC_DIR", "PROMETHEUS_MULTIPROC_DIR", "WEB_CONCURRENCY"):
            if name not in (extra_env or {}):
                env.pop(name, None)
        log_path = tmp_path / f"{kind}-{workers}-{len(processes)}.log"
        loaded_dir = tmp_path / f"loaded-{len(processes)}"
        loaded_dir.mkdir()
        env["LOADED_DIR"] = str(loaded_dir)
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                commands[kind], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        processes.append(process)
        deadline = time.monotonic() + 60
        while True:
            output = log_path.read_text(errors="replace")
            loaded = {int(marker.name) for marker in loaded_dir.iterdir()}
            if len(loaded) >= (loads or workers):
                break
            assert process.poll() is None, f"{kind} exited with {process.returncode}:\n{output}"
            assert time.monotonic() < deadline, (
                f"{kind}: {len(loaded)} of {workers} workers loaded:\n{output}"
            )
            time.sleep(0.1)
        # Each worker logs the warning before its marker, on the same stream, so both are in.
        warnings: dict[int, str] = {}
        for pid, rest in WARNING.findall(output):
            assert int(pid) not in warnings, f"worker {pid} warned twice:\n{output}"
            warnings[int(pid)] = rest
        return Started(output=output, server_pid=process.pid, loaded=loaded, warnings=warnings)

    yield run
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn", "fastapi", "uvicorn.run"])
def test_two_workers_without_the_directory_warn_once_per_worker(kind: str, start: object) -> None:
    # `fastapi run` imports the app in its supervisor too, to find it, then serves it in two workers.
    loads = 3 if kind == "fastapi" else 2
    started = start(kind, 2, loads=loads)  # type: ignore[operator]
    workers = started.loaded - {started.server_pid}
    assert len(started.loaded) == loads and len(workers) == 2, started.output
    assert set(started.warnings) == workers, started.output
    server = "gunicorn" if kind == "gunicorn" else "uvicorn"
    for pid, rest in started.warnings.items():
        assert rest.startswith(f"server={server} workers=2 pid={pid} setting=POOLWATCH_MULTIPROC_DIR "), rest
        assert "hint=" in rest


def test_workers_from_web_concurrency_are_counted(start: object) -> None:
    """The count comes from the server itself, not from its command line."""
    started = start("uvicorn-no-flag", 2, {"WEB_CONCURRENCY": "2"})  # type: ignore[operator]
    assert set(started.warnings) == started.loaded and len(started.loaded) == 2, started.output


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn"])
def test_one_worker_is_not_warned_about(kind: str, start: object) -> None:
    started = start(kind, 1)  # type: ignore[operator]
    assert len(started.loaded) == 1
    assert started.warnings == {} and EVENT not in started.output, started.output


@pytest.mark.parametrize("setting", ["POOLWATCH_MULTIPROC_DIR", "PROMETHEUS_MULTIPROC_DIR"])
def test_two_workers_with_the_directory_are_not_warned_about(
    setting: str, start: object, tmp_path: Path
) -> None:
    (tmp_path / "mp").mkdir()
    started = start("uvicorn", 2, {setting: str(tmp_path / "mp")})  # type: ignore[operator]
    assert len(started.loaded) == 2
    assert started.warnings == {} and EVENT not in started.output, started.output


# ---------------------------------------------------------------- in this process


def test_no_server_under_pytest() -> None:
    assert _workers.running_server() is None


def test_a_failing_check_is_counted_never_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_workers, "_decided_in", None)

    def broken() -> dict[int, object]:
        raise RuntimeError("no frames today")

    monkeypatch.setattr(sys, "_current_frames", broken)
    before = internal_errors.count
    watch = poolwatch.watch(registry=CollectorRegistry())  # must not raise
    assert internal_errors.count == before + 1
    watch.close()
