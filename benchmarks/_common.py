"""Helpers the end-to-end benchmarks share: the machine, a throwaway database, servers, tables."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path

import sqlalchemy as sa

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def database_url_from_env() -> str:
    return os.environ.get("POOLWATCH_TEST_DATABASE_URL", DEFAULT_URL)


def with_driver(url: str, driver: str) -> str:
    """``url`` with its driver replaced: ``postgresql+asyncpg``, ``postgresql+psycopg``..."""
    parsed = sa.make_url(url)
    return parsed.set(drivername=f"{parsed.get_backend_name()}+{driver}").render_as_string(
        hide_password=False
    )


def with_database(url: str, database: str) -> str:
    return sa.make_url(url).set(database=database).render_as_string(hide_password=False)


@contextlib.contextmanager
def throwaway_database(url: str, prefix: str) -> Iterator[str]:
    """A database of our own on ``url``'s server, dropped afterwards; yields its URL.

    Others run their tests on the same server, so the benchmark never touches their databases.
    """
    name = f"{prefix}_{os.getpid()}"
    admin = sa.create_engine(with_driver(url, "psycopg"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            yield with_database(url, name)
        finally:
            with admin.connect() as connection:
                connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> bytes:
    request = urllib.request.Request(url, headers=headers or {})  # loopback only, see callers
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def wait_until_serving(url: str, process: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before serving")
        with contextlib.suppress(OSError):
            http_get(url, timeout=1.0)
            return
        time.sleep(0.1)
    raise RuntimeError(f"server did not answer {url} in time")


def stop_process(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM (uvicorn runs its lifespan shutdown), then SIGKILL; only this process's group."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


def cpu_times(pid: int | None = None) -> float:
    """CPU seconds used by ``pid`` (user + system), or by the whole machine when None."""
    ticks = os.sysconf("SC_CLK_TCK")
    if pid is None:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()[1:]
        # user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
        values = [int(v) for v in fields[:8]]
        return (sum(values) - values[3] - values[4]) / ticks
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / ticks


def steal_seconds() -> float:
    """CPU time the hypervisor gave to other guests (all cores): a noisy neighbour, measured."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()[1:]
    return int(fields[7]) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int | None = None) -> int:
    path = f"/proc/{pid or 'self'}/status"
    with open(path) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in " + path)


def snapshot_sources(into: Path) -> Path:
    """Copy ``poolwatch/`` and ``demo_app/`` as they are now; returns a directory for sys.path.

    Others edit the working tree while a benchmark runs for minutes; servers started from a
    snapshot all run the same code, and the report names exactly which code that was.
    """
    target = into / "src"
    for package in ("poolwatch", "demo_app"):
        shutil.copytree(
            REPO / package, target / package, ignore=shutil.ignore_patterns("__pycache__", "*.db")
        )
    return target


def source_line(root: Path = REPO) -> str:
    """Which poolwatch was measured: the commit, uncommitted changes, and a hash of the files."""
    digest = hashlib.sha256()
    for path in sorted((root / "poolwatch").rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    changed = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "poolwatch", "demo_app"],
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    state = f" + {len(changed)} uncommitted changes in poolwatch/ or demo_app/" if changed else ""
    return f"- poolwatch source: commit {head or '?'}{state}; poolwatch/*.py sha256 {digest.hexdigest()[:12]}"


def machine_lines() -> list[str]:
    """The machine and the versions that matter, as Markdown bullet lines."""
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = []
    for package in ("SQLAlchemy", "asyncpg", "fastapi", "starlette", "uvicorn", "uvloop",
                    "httptools", "prometheus-client", "prometheus-fastapi-instrumentator",
                    "opentelemetry-sdk", "opentelemetry-instrumentation-sqlalchemy"):  # fmt: skip
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{package} {metadata.version(package)}")
    load = Path("/proc/loadavg").read_text().split()[:3]
    return [
        f"- machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu}, "
        f"{platform.system()} {platform.release()}",
        f"- Python {platform.python_version()} ({sys.implementation.name}); " + ", ".join(versions),
        f"- load average at start: {' '.join(load)}",
    ]


def print_header(title: str) -> None:
    """The heading every benchmark report starts with: what ran, on what, from which source."""
    print(f"# {title}\n")
    print("\n".join(machine_lines()))
    print(source_line())
    print(f"- command: `{command_line()}`", flush=True)


def command_line() -> str:
    return "python " + shlex.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """A Markdown table; ``align`` holds one of l/r per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)
