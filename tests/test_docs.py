"""README and the documentation site: short front door, every setting documented, no internal
issue numbers, and a site that builds with --strict (scripts/test.sh builds it; this proves the
build would catch a broken link)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from poolwatch import PoolWatchSettings

ROOT = Path(__file__).resolve().parent.parent
USER_FACING = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the manual belongs in docs/"


def test_every_setting_has_a_row_in_the_settings_reference() -> None:
    table = (ROOT / "docs" / "reference" / "settings.md").read_text()
    rows = set(re.findall(r"`(POOLWATCH_[A-Z_]+)`", table))
    missing = sorted(
        f"POOLWATCH_{name.upper()}"
        for name in PoolWatchSettings.model_fields
        if f"POOLWATCH_{name.upper()}" not in rows
    )
    assert not missing, f"settings without a row in docs/reference/settings.md: {missing}"


def test_no_internal_issue_numbers_in_user_facing_text() -> None:
    pattern = re.compile(r"\b(issue|stop)s? \d+", re.IGNORECASE)
    found = [
        f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}: {match[0]}"
        for path in USER_FACING
        for text in [path.read_text()]
        for match in pattern.finditer(text)
    ]
    assert not found, found


def test_the_strict_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    copy = tmp_path / "site-source"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy2(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    shutil.copy2(ROOT / "CHANGELOG.md", copy / "CHANGELOG.md")
    shutil.copytree(ROOT / "poolwatch", copy / "poolwatch")  # mkdocstrings reads the docstrings
    mkdocs = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    clean = subprocess.run(mkdocs, cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-3000:]
    page = copy / "docs" / "reference" / "health.md"
    page.write_text(page.read_text() + "\n[a broken link](settings.md#no-such-heading)\n")
    broken = subprocess.run(mkdocs, cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert broken.returncode != 0 and "no-such-heading" in broken.stderr, broken.stderr[-3000:]
