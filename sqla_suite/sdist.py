"""SQLAlchemy's own test suite, taken from the sdist of exactly the installed SQLAlchemy version.

The wheel ships ``sqlalchemy.testing`` (the plugin and fixtures) but not ``test/``; the sdist has
both. We extract ``test/`` and the configuration pytest reads (``setup.cfg`` with the
``[sqla_testing]`` and ``[db]`` sections, ``pyproject.toml`` with the pytest options), never
``lib/``: the suite must exercise the installed SQLAlchemy, compiled extensions included, the one
poolwatch runs against.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

# Written over the sdist's test/conftest.py. The original puts ../lib on sys.path and loads the
# bootstrap from ../lib; this one loads the same bootstrap from the installed package, found
# without importing sqlalchemy (the bootstrap exists so the plugin loads before the library).
CONFTEST = '''\
"""SQLAlchemy's test/conftest.py, bootstrapping from the installed SQLAlchemy (sqla_suite)."""

import importlib.util
import os
import sys

import pytest

os.environ["SQLALCHEMY_WARN_20"] = "true"

collect_ignore_glob = []

# omit py314.py test files on earlier versions of python
if sys.version_info < (3, 14):
    collect_ignore_glob.append("*_py314.py")

# this requires that sqlalchemy.testing was not already
# imported in order to work
pytest.register_assert_rewrite("sqlalchemy.testing.assertions")

_package = importlib.util.find_spec("sqlalchemy")
bootstrap_file = os.path.join(
    _package.submodule_search_locations[0], "testing", "plugin", "bootstrap.py"
)

with open(bootstrap_file) as f:
    code = compile(f.read(), "bootstrap.py", "exec")
    to_bootstrap = "pytest"
    exec(code, globals(), locals())
    from sqla_pytestplugin import *  # noqa
'''

# What the suite needs from the sdist besides test/.
CONFIG_FILES = ("setup.cfg", "pyproject.toml", "README.unittests.rst")
READY_MARK = ".sqla_suite_ready"


def installed_version() -> str:
    return metadata.version("sqlalchemy")


def download(version: str, cache: Path) -> Path:
    """The sdist of ``version`` in ``cache``, fetched with pip if it is not there yet."""
    cache.mkdir(parents=True, exist_ok=True)
    for candidate in (f"sqlalchemy-{version}.tar.gz", f"SQLAlchemy-{version}.tar.gz"):
        if (cache / candidate).is_file():
            return cache / candidate
    # --no-binary names sqlalchemy alone: with ":all:" pip would also build the sdist's build
    # requirements (Cython) from source to prepare its metadata, minutes instead of seconds.
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
        "--no-binary", "sqlalchemy", f"sqlalchemy=={version}", "-d", str(cache),
    ]  # fmt: skip
    subprocess.run(command, check=True)  # noqa: S603 - this interpreter's pip, fixed arguments
    found = sorted(cache.glob(f"[sS][qQ][lL][aA]lchemy-{version}.tar.gz"))
    if not found:
        raise RuntimeError(f"sqla_suite: pip left no sdist of sqlalchemy {version} in {cache}")
    return found[0]


def extract(archive: Path, version: str, cache: Path) -> Path:
    """``test/`` and the config files of the sdist under ``cache``; returns the suite's root."""
    root = cache / f"sqlalchemy-{version}"
    if (root / READY_MARK).is_file():
        return root
    if root.exists():
        shutil.rmtree(root)  # a half-finished extraction from an interrupted run
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            _top, _, rest = member.name.partition("/")
            if not rest:
                continue
            if (rest == "test" or rest.startswith("test/") or rest in CONFIG_FILES) and (
                member.isfile() or member.isdir()
            ):
                member.name = rest
                members.append(member)
        root.mkdir(parents=True)
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse links and paths out of root
            tar.extractall(root, members=members, filter="data")
        else:  # pragma: no cover - older 3.11 patch releases; members are plain files and dirs
            tar.extractall(root, members=members)  # noqa: S202
    if not (root / "test" / "conftest.py").is_file():
        raise RuntimeError(f"sqla_suite: {archive} has no test/conftest.py")
    (root / "test" / "conftest.py").write_text(CONFTEST)
    (root / READY_MARK).write_text(version + "\n")
    return root


def suite_root(cache: Path) -> tuple[str, Path]:
    """(installed version, root of its extracted suite), fetching and extracting as needed."""
    version = installed_version()
    archive = download(version, cache)
    return version, extract(archive, version, cache)
