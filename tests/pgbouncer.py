"""A real PgBouncer in front of the test PostgreSQL server, started by the test and ended by its PID.

Debian's ``pgbouncer`` package (``scripts/setup.sh test`` installs it). Each fixture use starts its
own process in the foreground (never ``-d``, so the PID is the one we started) on a free 127.0.0.1
port, with a generated ini and userlist in a temporary directory, as an unprivileged user:
``postgres`` when the suite runs as root (PgBouncer refuses to run as root), else the suite's own
user. It is ended with SIGTERM to that PID (SIGKILL if it lingers); a PgBouncer service the
package may have installed is never touched. Import the fixture with
``from tests.pgbouncer import pgbouncer  # noqa: F401``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.ports import free_port

# Roles the test may connect as through PgBouncer (trust auth: any password is ignored).
USERS = ("postgres",)


@dataclass(frozen=True)
class PgBouncer:
    port: int
    pid: int
    upstream_port: int

    def url(self, base: str, driver: str = "psycopg", user: str | None = None) -> str:
        """``base`` (a URL of the test server) pointed at this PgBouncer."""
        url = make_url(base).set(drivername=f"postgresql+{driver}", host="127.0.0.1", port=self.port)
        if user is not None:
            url = url.set(username=user)
        return url.render_as_string(hide_password=False)


def _unprivileged_user() -> pwd.struct_passwd | None:
    """Who PgBouncer runs as: ``postgres`` when we are root, else nobody else (ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        return pwd.getpwnam("nobody")


def _write_config(directory: Path, port: int, upstream_host: str, upstream_port: int) -> Path:
    userlist = directory / "userlist.txt"
    userlist.write_text("".join(f'"{user}" ""\n' for user in USERS))
    ini = directory / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"* = host={upstream_host} port={upstream_port}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {userlist}\n"
        # Session pooling: asyncpg's prepared statements work through it unchanged.
        "pool_mode = session\n"
        "max_client_conn = 100\n"
        "default_pool_size = 20\n"
        f"logfile = {directory / 'pgbouncer.log'}\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
    )
    return ini


def _accepting(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def pgbouncer(postgres_url: str) -> Iterator[PgBouncer]:
    binary = shutil.which("pgbouncer") or next(
        (path for path in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(path, os.X_OK)), None
    )
    if binary is None:
        pytest.fail("PgBouncer is not installed: bash scripts/setup.sh test (Debian's pgbouncer package)")
    upstream = make_url(postgres_url)
    upstream_port = upstream.port or 5432
    user = _unprivileged_user()
    directory = Path(tempfile.mkdtemp(prefix="poolwatch-pgbouncer-"))
    port = free_port()
    ini = _write_config(directory, port, upstream.host or "127.0.0.1", upstream_port)
    if user is not None:
        for path in (directory, *directory.iterdir()):
            os.chown(path, user.pw_uid, user.pw_gid)
    process = subprocess.Popen(
        [binary, str(ini)],
        user=user.pw_uid if user is not None else None,
        group=user.pw_gid if user is not None else None,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        while not _accepting(port):
            if process.poll() is not None or time.monotonic() > deadline:
                log = (
                    (directory / "pgbouncer.log").read_text()
                    if (directory / "pgbouncer.log").exists()
                    else ""
                )
                stderr = (
                    process.stderr.read().decode() if process.stderr and process.poll() is not None else ""
                )
                pytest.fail(f"PgBouncer did not start on 127.0.0.1:{port}: {stderr}{log}")
            time.sleep(0.05)
        yield PgBouncer(port=port, pid=process.pid, upstream_port=upstream_port)
    finally:
        # By its PID: the process this fixture started, nothing else.
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if process.stderr is not None:
            process.stderr.close()
        shutil.rmtree(directory, ignore_errors=True)
