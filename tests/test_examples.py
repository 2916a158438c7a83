"""Every code block a reader may copy, from README.md and docs/, is run here.

Each fenced block says what it is in an HTML comment on the line above it (invisible on GitHub and
on the documentation site):

- ``<!-- run: python -->``: a program, run with this suite's Python in an empty directory;
- ``<!-- run: app -->``: a program that defines a FastAPI ``app``; it is also served a few requests
  (its lifespan run, ``/metrics``, ``/health/live``, ``/health/db`` and every GET route without a
  path parameter), none of which may be a server error;
- ``<!-- run: pytest -->``: a test module, run by pytest;
- ``<!-- run: shell -->``, ``<!-- run: shell, server -->``, ``<!-- run: shell, client -->`` and
  ``<!-- run: file NAME -->``: the install and quick-start commands, run as written by bash in a
  fresh virtualenv from the root of a copy of the checkout, after the files are saved under their
  names; each server is started, asked the client blocks' questions and stopped, on SQLite and on
  PostgreSQL. The one change made to a command is the port: 8000 becomes a free port;
- ``<!-- not run: why -->``: output, YAML for Kubernetes, a command that needs Docker...

A block with neither comment fails ``test_every_block_is_run_or_says_why``. Blocks with the same
text are run once.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.ports import free_port
from tests.test_operator_e2e import _database

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_PAGE = ROOT / "docs" / "getting-started.md"
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
DIRECTIVE = re.compile(r"<!--\s*(?P<kind>run|not run):\s*(?P<what>.*?)\s*-->")
PYTHON_MODES = {"python", "app", "pytest"}
SHELL_MODES = {"shell", "shell, server", "shell, client"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    code: str
    directive: str | None  # "run: app", "not run: ...", or None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def mode(self) -> str | None:
        if self.directive is None or not self.directive.startswith("run:"):
            return None
        return self.directive.split(":", 1)[1].strip()


def blocks_of(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        indent = len(match["indent"])
        code = "".join(
            line[indent:] if line[:indent].isspace() else line for line in match["body"].splitlines(True)
        )
        before = [line.strip() for line in text[: match.start()].splitlines() if line.strip()]
        directive = None
        if before and (comment := DIRECTIVE.fullmatch(before[-1])):
            directive = f"{comment['kind']}: {comment['what']}"
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(page, line, match["lang"], code, directive))
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks_of(page)]


def unique(blocks: list[Block]) -> list[Block]:
    seen: dict[tuple[str | None, str], Block] = {}
    for block in blocks:
        seen.setdefault((block.mode, block.code), block)
    return list(seen.values())


PYTHON_BLOCKS = unique([b for b in ALL_BLOCKS if b.mode in PYTHON_MODES])


def test_every_block_is_run_or_says_why() -> None:
    assert len(ALL_BLOCKS) > 20, f"found only {len(ALL_BLOCKS)} code blocks: is the fence pattern right?"
    problems = []
    for block in ALL_BLOCKS:
        if block.directive is None:
            problems.append(f"{block.where}: no <!-- run: ... --> or <!-- not run: why --> above it")
        elif block.directive.startswith("not run:") and not block.directive[len("not run:") :].strip():
            problems.append(f"{block.where}: 'not run' without a reason")
        elif block.mode is not None:
            mode = block.mode
            if mode in PYTHON_MODES or mode.startswith("file "):
                expected = "python"
            elif mode in SHELL_MODES:
                expected = "bash"
            else:
                problems.append(f"{block.where}: unknown directive {block.directive!r}")
                continue
            if block.lang != expected:
                problems.append(f"{block.where}: {block.directive!r} on a {block.lang or 'plain'} block")
    assert not problems, "\n".join(problems)


def test_shell_blocks_outside_the_getting_started_page_are_copies_of_its_blocks() -> None:
    """README repeats the install and quick start; what runs is the getting-started page, so every
    shell block and saved file elsewhere must be one of its blocks, word for word."""
    reference = {(b.mode, b.code) for b in blocks_of(SHELL_PAGE)}
    strays = [
        b.where
        for b in ALL_BLOCKS
        if b.page != SHELL_PAGE
        and b.mode is not None
        and (b.mode in SHELL_MODES or b.mode.startswith("file "))
        and (b.mode, b.code) not in reference
    ]
    assert not strays, f"shell blocks that the getting-started page does not have: {strays}"


# -- Python blocks ------------------------------------------------------------------------------

APP_DRIVER = r"""
import runpy, sys, warnings
warnings.simplefilter("ignore", DeprecationWarning)
from starlette.testclient import TestClient

namespace = runpy.run_path(sys.argv[1], run_name="example")
app = namespace["app"]
paths = ["/health/live", "/health/db", "/metrics"]
for route in getattr(app, "routes", []):
    path = getattr(route, "path", "")
    if "GET" in (getattr(route, "methods", None) or ()) and "{" not in path and path not in paths:
        if not path.startswith(("/docs", "/redoc", "/openapi")):
            paths.append(path)
with TestClient(app) as client:
    for path in paths:
        answer = client.get(path)
        print(path, answer.status_code)
        assert answer.status_code < 500, (path, answer.status_code, answer.text[:500])
        if path in ("/health/live", "/health/db", "/metrics"):
            assert answer.status_code == 200, (path, answer.status_code, answer.text[:500])
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLWATCH_") and k != "DATABASE_URL"}
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: f"{b.where}:{b.mode}")
def test_python_block_runs(block: Block, tmp_path: Path) -> None:
    example = tmp_path / ("test_example.py" if block.mode == "pytest" else "example.py")
    example.write_text(block.code)
    env = _clean_env(PYTHONPATH=str(ROOT))  # the checkout's poolwatch, as installed in editable mode
    if block.mode == "pytest":
        args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", example.name]
    elif block.mode == "app":
        (tmp_path / "driver.py").write_text(APP_DRIVER)
        args = [sys.executable, "driver.py", example.name]
    else:
        args = [sys.executable, example.name]
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (
        f"{block.where} ({block.directive}) failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )


# -- the install and quick-start commands, in a fresh virtualenv --------------------------------


@pytest.fixture(scope="module")
def fresh_checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the checkout as a clone has it: no virtualenv, caches, build output or databases."""
    copy = tmp_path_factory.mktemp("checkout") / "poolwatch"
    ignore = shutil.ignore_patterns(
        ".git", ".venv", ".cache", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache",
        "site", "dist", "build", "*.db", "*.egg-info",
    )  # fmt: skip
    shutil.copytree(ROOT, copy, ignore=ignore)
    return copy


@dataclass
class Shell:
    cwd: Path
    env: dict[str, str]

    def run(self, script: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip


@contextlib.contextmanager
def _server(shell: Shell, command: str, env: dict[str, str], port: int, log: Path) -> Iterator[None]:
    with log.open("w") as out:
        process = subprocess.Popen(
            ["bash", "-c", f"exec {command}"], cwd=shell.cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while True:
                assert process.poll() is None, f"{command!r} exited:\n{log.read_text()}"
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=2).status_code == 200:
                        break
                assert time.monotonic() < deadline, f"{command!r} never answered:\n{log.read_text()}"
                time.sleep(0.2)
            yield
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def test_getting_started_commands_run_as_written(
    fresh_checkout: Path, postgres_url: str, tmp_path: Path
) -> None:
    blocks = blocks_of(SHELL_PAGE)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = _clean_env(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}")
    env.pop("PYTHONHOME", None)
    shell = Shell(fresh_checkout, env)
    servers: list[str] = []
    clients: list[str] = []
    for block in blocks:
        mode = block.mode or ""
        if mode == "shell":
            result = shell.run(block.code)
            assert result.returncode == 0, (
                f"{block.where} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        elif mode.startswith("file "):
            (fresh_checkout / mode.split(" ", 1)[1]).write_text(block.code)
        elif mode == "shell, server":
            servers.append(block.code.strip())
        elif mode == "shell, client":
            clients.append(block.code)
    assert servers and clients, "the getting-started page has no server or client commands"
    # What was installed is the wheel of this checkout, not the checkout itself.
    where = shell.run("cd / && python -c 'import poolwatch; print(poolwatch.__file__)'")
    assert str(venv) in where.stdout, where.stdout + where.stderr

    with _database(postgres_url) as database:
        for command in servers:
            module = command.split()[1].split(":")[0]
            is_async = "create_async_engine" in (fresh_checkout / f"{module}.py").read_text()
            driver = "postgresql+asyncpg://" if is_async else "postgresql+psycopg://"
            for url in (None, database.replace("postgresql://", driver, 1)):
                port = free_port()
                server_env = dict(env, UVICORN_PORT=str(port))
                if url is not None:
                    server_env["DATABASE_URL"] = url
                log = tmp_path / f"{module}-{'pg' if url else 'sqlite'}.log"
                with _server(shell, command, server_env, port, log):
                    for client in clients:
                        result = shell.run(client.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), timeout=60)
                        label = f"{command!r} on {'PostgreSQL' if url else 'SQLite'}"
                        assert result.returncode == 0, (
                            f"{label}:\n{result.stdout}\n{result.stderr}\n{log.read_text()}"
                        )
                        assert '"time":' in result.stdout, result.stdout
                        assert '"status":"ok"' in result.stdout, result.stdout
                        assert "poolwatch_connections{" in result.stdout, result.stdout
                assert "Traceback" not in log.read_text(), log.read_text()
