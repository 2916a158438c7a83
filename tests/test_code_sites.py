"""Code sites (``file:line`` in events, the live page and the test guard) as a person reads them:
relative to the application's root when under it, an installed package's file from its package."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import poolwatch
from poolwatch._record import events
from poolwatch._record.events import (
    describe_site,
    remember_application_root,
    set_application_root,
    shown_path,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _root_restored() -> Iterator[None]:
    before = events._application_root
    yield
    events._application_root = before
    shown_path.cache_clear()


def test_a_file_under_the_root_is_shown_relative_to_it() -> None:
    set_application_root(str(ROOT))
    assert shown_path(str(ROOT / "demo_app" / "api.py")) == os.path.join("demo_app", "api.py")
    code = sys._getframe().f_code
    site, function = describe_site((code, sys._getframe().f_lasti))
    assert site.startswith(os.path.join("tests", "test_code_sites.py") + ":")
    assert function == "test_a_file_under_the_root_is_shown_relative_to_it"


def test_installed_packages_keep_their_package_path_and_other_files_stay_whole() -> None:
    set_application_root(str(ROOT))
    # Even inside the root's own virtualenv, an installed package reads from its package.
    assert shown_path(sa.__file__) == os.path.join("sqlalchemy", "__init__.py")
    assert shown_path("/usr/lib/python3/dist-packages/acme/db.py") == "acme/db.py"
    assert shown_path("/opt/other/app.py") == "/opt/other/app.py"
    assert shown_path(str(ROOT) + "-sibling/app.py") == str(ROOT) + "-sibling/app.py"  # not a prefix match
    assert shown_path("<string>") == "<string>"


def test_the_filesystem_root_shortens_nothing() -> None:
    set_application_root("/")
    assert shown_path("/srv/app/demo_app/api.py") == "/srv/app/demo_app/api.py"


def test_a_symlinked_checkout_is_still_under_its_root(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "app").mkdir(parents=True)
    (real / "app" / "api.py").write_text("")
    link = tmp_path / "link"
    link.symlink_to(real)
    set_application_root(str(link))
    assert shown_path(str(link / "app" / "api.py")) == os.path.join("app", "api.py")
    assert shown_path(str(real / "app" / "api.py")) == os.path.join("app", "api.py")


def test_the_root_is_the_working_directory_when_poolwatch_first_watches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync_url: str
) -> None:
    events._application_root = None
    monkeypatch.chdir(tmp_path)
    engine = sa.create_engine(sync_url)
    watch = poolwatch.watch(engine, registry=CollectorRegistry())
    try:
        assert shown_path(str(tmp_path / "svc" / "main.py")) == os.path.join("svc", "main.py")
        # The first one wins: a later change of directory does not move it.
        monkeypatch.chdir(ROOT)
        remember_application_root()
        assert shown_path(str(tmp_path / "svc" / "main.py")) == os.path.join("svc", "main.py")
    finally:
        watch.close()
        engine.dispose()


def test_without_a_watch_the_first_site_described_takes_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events._application_root = None
    shown_path.cache_clear()
    monkeypatch.chdir(tmp_path)
    assert shown_path(str(tmp_path / "test_shop.py")) == "test_shop.py"
