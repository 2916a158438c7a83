"""The exact refusals of bad settings: the whole message, since an operator acts on its words.

``build_settings`` is what ``watch()`` and ``instrument()`` call first; each refusal is checked as
a keyword and, where the environment can give it, through the environment as a string.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from poolwatch._settings import ENV_PREFIX, PoolWatchSettings, build_settings, setting_variables

TOKEN_REQUIRED = (
    "poolwatch: invalid setting health_token (POOLWATCH_HEALTH_TOKEN): "
    "required when health_details is 'token'"
)
UI_TOKEN_REQUIRED = (
    "poolwatch: invalid setting ui_token (POOLWATCH_UI_TOKEN): a non-empty token is required "
    "when ui is 'token' (or set health_token, POOLWATCH_HEALTH_TOKEN, which the live page "
    "then uses)"
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if key.upper().startswith("POOLWATCH_") or key.upper() == "PROMETHEUS_MULTIPROC_DIR":
            monkeypatch.delenv(key)
    yield


def refusal(overrides: dict[str, object]) -> str:
    with pytest.raises(ValueError) as raised:
        build_settings(overrides)
    return str(raised.value)


def test_token_details_without_a_token_are_refused_by_name() -> None:
    assert refusal({"health_details": "token"}) == TOKEN_REQUIRED


def test_token_details_without_a_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOLWATCH_HEALTH_DETAILS", "token")
    assert refusal({}) == TOKEN_REQUIRED
    monkeypatch.setenv("POOLWATCH_HEALTH_TOKEN", "t0ken")
    assert build_settings({}).health_token.get_secret_value() == "t0ken"  # type: ignore[union-attr]


@pytest.mark.parametrize("ui_token", [None, "", "   ", "\t"])
def test_a_token_page_without_a_usable_token_is_refused(ui_token: str | None) -> None:
    overrides: dict[str, object] = {"ui": "token"}
    if ui_token is not None:
        overrides["ui_token"] = ui_token
    assert refusal(overrides) == UI_TOKEN_REQUIRED


def test_a_token_page_takes_its_own_token_else_the_health_token() -> None:
    own = build_settings({"ui": "token", "ui_token": "page-token", "health_token": "health-token"})
    assert own.ui_secret is not None and own.ui_secret.get_secret_value() == "page-token"
    shared = build_settings({"ui": "token", "health_token": "health-token"})
    assert shared.ui_secret is not None and shared.ui_secret.get_secret_value() == "health-token"
    # A blank page token is no token (as an empty variable is unset): the health token serves.
    blank = build_settings({"ui": "token", "ui_token": " ", "health_token": "health-token"})
    assert blank.ui_secret is not None and blank.ui_secret.get_secret_value() == "health-token"


def test_a_token_page_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOLWATCH_UI", "token")
    assert refusal({}) == UI_TOKEN_REQUIRED
    monkeypatch.setenv("POOLWATCH_UI_TOKEN", "page-token")
    assert build_settings({}).ui_secret.get_secret_value() == "page-token"  # type: ignore[union-attr]


# -- the multi-worker directory ------------------------------------------------------------------


def test_a_file_given_as_the_directory_is_refused_naming_where_it_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    expected = (
        "poolwatch: invalid setting multiproc_dir (POOLWATCH_MULTIPROC_DIR): it exists and is not a "
        f"directory (got {str(a_file)!r}"
    )
    assert refusal({"multiproc_dir": a_file}) == expected + ")"
    monkeypatch.setenv("POOLWATCH_MULTIPROC_DIR", str(a_file))
    assert refusal({}) == expected + ")"
    monkeypatch.delenv("POOLWATCH_MULTIPROC_DIR")
    # Only PROMETHEUS_MULTIPROC_DIR: the message says the value came from there.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(a_file))
    assert refusal({}) == expected + ", taken from PROMETHEUS_MULTIPROC_DIR)"
    # Either variable of its own, in any case, names the setting itself.
    monkeypatch.setenv("poolwatch_multiproc_dir", str(a_file))
    assert refusal({}) == expected + ")"


def test_a_directory_that_cannot_be_made_is_refused_with_the_reason(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    below = a_file / "workers"
    assert refusal({"multiproc_dir": below}) == (
        "poolwatch: invalid setting multiproc_dir (POOLWATCH_MULTIPROC_DIR): cannot create it or "
        f"write a file in it: Not a directory (got {str(below)!r})"
    )


def test_a_missing_directory_is_made_and_an_existing_one_taken_as_it_is(tmp_path: Path) -> None:
    nested = tmp_path / "a" / "b" / "workers"
    assert build_settings({"multiproc_dir": nested}).multiproc_dir == nested
    assert nested.is_dir() and list(nested.iterdir()) == []  # the write check leaves nothing
    (nested / "keep").write_text("a worker's file")
    assert build_settings({"multiproc_dir": nested}).multiproc_dir == nested  # exists: fine
    assert [p.name for p in nested.iterdir()] == ["keep"]


# -- pydantic's report, rewritten to name the setting ---------------------------------------------


def test_an_invalid_value_names_the_setting_its_variable_and_the_value() -> None:
    message = refusal({"leak_threshold_seconds": -1})
    assert message.startswith(
        "poolwatch: invalid setting leak_threshold_seconds (POOLWATCH_LEAK_THRESHOLD_SECONDS): "
    )
    assert message.endswith(" (got -1)")


def test_an_invalid_token_is_never_echoed() -> None:
    message = refusal({"health_token": 12345})
    # pydantic's own words, and nothing after them: not the value, not an empty "(got ...)".
    assert message == (
        "poolwatch: invalid setting health_token (POOLWATCH_HEALTH_TOKEN): Input should be a valid string"
    )


def test_two_problems_are_both_named_in_one_message() -> None:
    message = refusal({"leak_threshold_seconds": -1, "health_cache_seconds": "soon"})
    first, second = message.removeprefix("poolwatch: ").split("; ")
    assert first.startswith("invalid setting leak_threshold_seconds (POOLWATCH_LEAK_THRESHOLD_SECONDS): ")
    assert second.startswith("invalid setting health_cache_seconds (POOLWATCH_HEALTH_CACHE_SECONDS): ")
    assert second.endswith(" (got 'soon')")


def test_an_unknown_keyword_is_refused_with_the_closest_setting() -> None:
    assert refusal({"leak_treshold_seconds": 5}) == (
        "poolwatch: unknown setting 'leak_treshold_seconds' (did you mean 'leak_threshold_seconds'?)"
    )
    assert refusal({"zzzz": 5}) == "poolwatch: unknown setting 'zzzz'"


def test_every_unknown_variable_is_reported_once_even_after_one_seen_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, second = (
        f"POOLWATCH_ZZ_FIRST_{uuid.uuid4().hex[:6]}",
        f"POOLWATCH_ZZ_SECOND_{uuid.uuid4().hex[:6]}",
    )
    monkeypatch.setenv(first, "1")
    with structlog.testing.capture_logs() as events:
        build_settings({})
    assert [e["variable"] for e in events if e["event"] == "poolwatch.unknown_setting"] == [first]
    # The first one, already reported, comes first in the environment: the second is still seen.
    monkeypatch.setenv(second, "1")
    with structlog.testing.capture_logs() as events:
        build_settings({})
        build_settings({})
    assert [e["variable"] for e in events if e["event"] == "poolwatch.unknown_setting"] == [second]


def test_no_variable_a_setting_is_read_from_is_reported_unknown() -> None:
    """Every ``POOLWATCH_*`` name a setting accepts (its own and any alias) is a known variable:
    setting one is never answered with ``poolwatch.unknown_setting``."""
    accepted = {ENV_PREFIX + name.upper() for name in PoolWatchSettings.model_fields}
    for field in PoolWatchSettings.model_fields.values():
        for alias in getattr(field.validation_alias, "choices", ()):
            if isinstance(alias, str) and alias.upper().startswith(ENV_PREFIX):
                accepted.add(alias.upper())
    assert set(setting_variables()) == accepted
    assert setting_variables()["POOLWATCH_MULTIPROC_DIR"] == "multiproc_dir"
