"""Bad settings fail at start-up with a ValueError naming the setting; misspelt variables are reported."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

import poolwatch
from poolwatch import _settings
from poolwatch._serve.multiprocess import multiprocess_directory

MULTIPROC_DIR = "poolwatch: invalid setting multiproc_dir (POOLWATCH_MULTIPROC_DIR): "


@pytest.fixture(autouse=True)
def _no_multiproc_dir_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper() in ("POOLWATCH_MULTIPROC_DIR", "PROMETHEUS_MULTIPROC_DIR"):
            monkeypatch.delenv(name)


def _refused(registry: CollectorRegistry, **settings: Any) -> str:
    """The message of the ValueError that watch() must raise; fails if it starts instead."""
    try:
        watch = poolwatch.watch(registry=registry, **settings)
    except ValueError as error:
        # A refused start leaves nothing registered behind.
        assert list(registry.collect()) == []
        return str(error)
    watch.close()
    pytest.fail(f"watch({settings}) started instead of refusing")


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    return path


@pytest.mark.parametrize(
    ("where", "problem"),
    [
        (lambda tmp: _a_file(tmp), "it exists and is not a directory"),
        (lambda tmp: _a_file(tmp) / "under", "cannot create it or write a file in it: Not a directory"),
        # /proc takes no new entries, not even from root.
        (lambda tmp: Path("/proc/poolwatch-test"), "cannot create it or write a file in it"),
        (lambda tmp: Path("/proc"), "cannot create it or write a file in it"),
    ],
    ids=["a file", "under a file", "cannot be created", "not writable"],
)
@pytest.mark.parametrize("given_as", ["keyword", "environment"])
def test_a_multiproc_dir_that_cannot_hold_files_is_refused_naming_the_setting(
    tmp_path: Path,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    where: Any,
    problem: str,
    given_as: str,
) -> None:
    directory = where(tmp_path)
    if given_as == "keyword":
        message = _refused(registry, multiproc_dir=directory)
    else:
        monkeypatch.setenv("POOLWATCH_MULTIPROC_DIR", str(directory))
        message = _refused(registry)
    assert message.startswith(MULTIPROC_DIR + problem), message
    assert repr(str(directory)) in message


def test_the_message_says_when_the_directory_came_from_prometheus_multiproc_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(_a_file(tmp_path)))
    # The gunicorn hooks read the directory the same way, so the master refuses it too.
    with pytest.raises(ValueError) as refused:
        multiprocess_directory()
    assert str(refused.value).startswith(MULTIPROC_DIR + "it exists and is not a directory")
    assert str(refused.value).endswith(", taken from PROMETHEUS_MULTIPROC_DIR)")


def test_a_usable_multiproc_dir_is_created_and_left_clean(tmp_path: Path) -> None:
    directory = tmp_path / "shared" / "poolwatch"
    assert _settings.build_settings({"multiproc_dir": directory}).multiproc_dir == directory
    assert directory.is_dir() and list(directory.iterdir()) == []


@pytest.mark.parametrize(
    "setting",
    ["metrics_port", "leak_threshold_seconds", "slow_query_seconds", "health_deadline_seconds",
     "health_cache_seconds", "multiproc_interval_seconds"],
)  # fmt: skip
def test_a_bool_is_not_a_number(registry: CollectorRegistry, setting: str) -> None:
    # metrics_port=True used to serve on port 1.
    message = _refused(registry, **{setting: True})
    assert f"invalid setting {setting} (POOLWATCH_{setting.upper()}): " in message
    assert "not a bool" in message


def test_numbers_from_the_environment_still_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOLWATCH_METRICS_PORT", "9100")
    monkeypatch.setenv("POOLWATCH_LEAK_THRESHOLD_SECONDS", "2.5")
    settings = _settings.build_settings({})
    assert (settings.metrics_port, settings.leak_threshold_seconds) == (9100, 2.5)


def test_a_misspelt_variable_is_reported_once_naming_the_closest_setting(
    monkeypatch: pytest.MonkeyPatch, registry: CollectorRegistry
) -> None:
    monkeypatch.setattr(_settings, "_reported_variables", set(), raising=False)
    monkeypatch.setenv("POOLWATCH_LEAK_TRESHOLD_SECONDS", "5")
    monkeypatch.setenv("poolwatch_helth_token", "a secret value")  # read case-insensitively
    monkeypatch.setenv("POOLWATCH_XYZZY", "1")
    # Not settings, and not typos either: left alone.
    monkeypatch.setenv("POOLWATCH_TEST_DATABASE_URL", "postgresql://example/db")
    monkeypatch.setenv("POOLWATCH_METRICS_HOST", "127.0.0.1")
    with capture_logs() as events:
        for _ in range(3):
            poolwatch.watch(registry=registry).close()
    reported = sorted(
        (event for event in events if event["event"] == "poolwatch.unknown_setting"),
        key=lambda event: str(event["variable"]),
    )
    assert reported == [
        {"event": "poolwatch.unknown_setting", "log_level": "warning",
         "variable": "POOLWATCH_LEAK_TRESHOLD_SECONDS",
         "closest": "leak_threshold_seconds (POOLWATCH_LEAK_THRESHOLD_SECONDS)"},
        {"event": "poolwatch.unknown_setting", "log_level": "warning",
         "variable": "POOLWATCH_XYZZY"},
        {"event": "poolwatch.unknown_setting", "log_level": "warning",
         "variable": "poolwatch_helth_token", "closest": "health_token (POOLWATCH_HEALTH_TOKEN)"},
    ]  # fmt: skip
    # A variable's value is never repeated (it may be a secret).
    assert "a secret value" not in repr(events)


def test_the_same_typo_as_a_keyword_is_refused_naming_the_closest_setting(
    registry: CollectorRegistry,
) -> None:
    message = _refused(registry, leak_treshold_seconds=5)
    assert message == (
        "poolwatch: unknown setting 'leak_treshold_seconds' (did you mean 'leak_threshold_seconds'?)"
    )
