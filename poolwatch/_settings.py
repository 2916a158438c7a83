"""Settings: one pydantic-settings class, read from ``POOLWATCH_*`` and overridable by keyword.

Bad input fails at start-up with a ``ValueError`` that names the setting and its variable, in the
form ``poolwatch: invalid setting X (POOLWATCH_X): ...``. A ``POOLWATCH_*`` variable that names no
setting cannot be refused the way an unknown keyword is (the environment is shared with everything
else in the process), so it is reported once per process as a ``poolwatch.unknown_setting`` warning
event, naming the closest setting.
"""

from __future__ import annotations

import difflib
import os
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypedDict

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ._log import internal_errors, logger

ENV_PREFIX = "POOLWATCH_"
# Variables with poolwatch's prefix that are not settings and must not be reported as misspelt
# ones. Keep this short: each entry is a name a typo can hide behind.
NOT_SETTINGS = frozenset({"POOLWATCH_TEST_DATABASE_URL"})  # the test suite's database


class PoolWatchSettings(BaseSettings):
    """Everything poolwatch can be told. Environment first, keyword arguments win."""

    model_config = SettingsConfigDict(
        env_prefix="POOLWATCH_",
        extra="forbid",
        populate_by_name=True,
        frozen=True,
        validate_default=True,
    )

    leak_threshold_seconds: float = Field(30.0, ge=0, allow_inf_nan=False)
    leak_capture_stack: bool = False
    slow_query_seconds: float = Field(1.0, ge=0, allow_inf_nan=False)
    # One checkout holding its connection this long outside any statement is logged; 0 off.
    held_idle_seconds: float = Field(5.0, ge=0, allow_inf_nan=False)
    # Of that, the time idle inside an open transaction (locks held, vacuum held back); 0 off.
    idle_in_transaction_seconds: float = Field(5.0, ge=0, allow_inf_nan=False)
    # A checkout taken before a streaming, SSE or file response started and held this long after
    # it started (a yield dependency's session living until the stream ends) is logged; 0 off.
    held_during_response_seconds: float = Field(5.0, ge=0, allow_inf_nan=False)
    # None (or an empty POOLWATCH_METRICS_PATH) serves nothing there: for an application that
    # exposes the registry itself.
    metrics_path: str | None = "/metrics"
    health_db_path: str | None = "/health/db"
    health_live_path: str | None = "/health/live"
    health_deadline_seconds: float = Field(0.5, gt=0, le=60, allow_inf_nan=False)
    health_cache_seconds: float = Field(2.0, ge=0, le=3600, allow_inf_nan=False)
    health_details: Literal["never", "token", "always"] = "never"
    health_token: SecretStr | None = None
    # 200 answers "degraded": readiness that fails on load takes pods out exactly when the others
    # are loaded too (README, Kubernetes).
    health_saturated_status: Literal[503, 200] = 200
    # A full pool with callers queued that made no progress (no checkout, checkin, statement or new
    # connection) for this long is "down" (stalled). Longer than a slow statement or a connect
    # timeout, shorter than a readiness probe's failureThreshold x periodSeconds (README).
    health_stall_seconds: float = Field(10.0, gt=0, le=3600, allow_inf_nan=False)
    # A pool checkout that times out gets a PEP 678 note naming who holds the connections.
    timeout_note: bool = True
    metrics_port: int | None = Field(None, ge=1, le=65535)
    metrics_host: str = Field("0.0.0.0", min_length=1)
    tracing: bool = False
    # Multi-worker servers: where workers share their numbers (see _multiprocess); prometheus_client's
    # own PROMETHEUS_MULTIPROC_DIR is taken when poolwatch's is not set.
    multiproc_dir: Path | None = Field(
        None,
        validation_alias=AliasChoices("multiproc_dir", "POOLWATCH_MULTIPROC_DIR", "PROMETHEUS_MULTIPROC_DIR"),
    )
    multiproc_interval_seconds: float = Field(1.0, ge=0.01, le=3600, allow_inf_nan=False)
    # The live page (``_serve/page.py``): off unless asked for, since it shows code sites and routes.
    ui: Literal["never", "token", "always"] = "never"
    ui_path: str = "/poolwatch"
    # Falls back to health_token: one secret for everything behind a bearer token.
    ui_token: SecretStr | None = None
    # The connection limit of this pool's role and database on its server
    # (poolwatch_server_connections_max): None reads it from the server, a number is used as given
    # (a pooler's own limit, say), "off" (or 0) never reads it and reports none.
    server_connections_max: int | Literal["off"] | None = None

    @field_validator("health_saturated_status", mode="before")
    @classmethod
    def _status_from_text(cls, value: object) -> object:
        # The environment gives strings, and pydantic does not coerce "200" to Literal[503, 200].
        if isinstance(value, str) and value.strip() in {"200", "503"}:
            return int(value.strip())
        return value

    @field_validator("server_connections_max", mode="before")
    @classmethod
    def _limit_from_text(cls, value: object) -> object:
        # The environment gives strings: "120", "off" (and "0", the same as off).
        if isinstance(value, bool):
            raise ValueError("must be a whole number of connections or 'off', not a bool")
        if isinstance(value, str):
            text = value.strip().lower()
            if text in {"", "none"}:
                return None
            if text in {"off", "0"}:
                return "off"
            if not text.isdecimal():
                raise ValueError("must be a whole number of connections or 'off'")
            value = int(text)
        if isinstance(value, int):
            if value < 0:
                raise ValueError("must be a whole number of connections or 'off'")
            return "off" if value == 0 else value
        if value is None or value == "off":
            return value
        raise ValueError("must be a whole number of connections or 'off'")

    @field_validator("metrics_path", "health_db_path", "health_live_path", mode="before")
    @classmethod
    def _empty_path_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("metrics_port", "multiproc_dir", "health_token", "ui_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # A deployment can often only empty a variable, not remove it (``FOO=`` in a compose file, a
        # Helm value left blank): for a setting that is unset by default, empty means unset, never
        # port "", the working directory "." as the shared directory, or an empty token.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("health_token", "ui_token")
    @classmethod
    def _token_is_text(cls, value: SecretStr | None) -> SecretStr | None:
        # A variable holding bytes that are not UTF-8 reaches Python as lone surrogates: no request
        # could ever carry that token, and comparing against it would fail on every request.
        if value is not None:
            try:
                value.get_secret_value().encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("the token must be UTF-8 text; it holds bytes that are not") from None
        return value

    @field_validator(
        "leak_threshold_seconds",
        "slow_query_seconds",
        "held_idle_seconds",
        "idle_in_transaction_seconds",
        "held_during_response_seconds",
        "health_deadline_seconds",
        "health_cache_seconds",
        "health_stall_seconds",
        "metrics_port",
        "multiproc_interval_seconds",
        mode="before",
    )
    @classmethod
    def _number_is_not_a_bool(cls, value: Any) -> Any:
        # pydantic takes True for 1 in a number: metrics_port=True would serve on port 1.
        if isinstance(value, bool):
            raise ValueError("must be a number, not a bool")
        return value

    @field_validator("metrics_path", "health_db_path", "health_live_path")
    @classmethod
    def _path_is_absolute(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith("/") or any(c.isspace() for c in value):
            raise ValueError("must be an absolute URL path such as '/metrics'")
        return value

    @field_validator("ui_path")
    @classmethod
    def _ui_path_is_a_page(cls, value: str) -> str:
        # The JSON lives at <ui_path>/state, so a trailing slash would make "//state".
        trimmed = value.rstrip("/")
        if not value.startswith("/") or not trimmed or any(c.isspace() or c in "?#" for c in value):
            raise ValueError("must be an absolute URL path other than '/', such as '/poolwatch'")
        return trimmed

    @property
    def ui_secret(self) -> SecretStr | None:
        """The live page's bearer token: its own, else the health token."""
        return self.ui_token if self.ui_token is not None else self.health_token


class SettingsKeywords(TypedDict, total=False):
    """The settings as keyword arguments (``watch(engine, leak_threshold_seconds=5)``), for type
    checkers: a misspelt or mistyped setting is an error there too, not only at start-up.

    ``tests/test_public_api.py`` keeps its keys equal to ``PoolWatchSettings``' fields.
    """

    leak_threshold_seconds: float
    leak_capture_stack: bool
    slow_query_seconds: float
    held_idle_seconds: float
    idle_in_transaction_seconds: float
    held_during_response_seconds: float
    metrics_path: str | None
    health_db_path: str | None
    health_live_path: str | None
    health_deadline_seconds: float
    health_cache_seconds: float
    health_details: Literal["never", "token", "always"]
    health_token: str | SecretStr | None
    health_saturated_status: Literal[503, 200]
    health_stall_seconds: float
    timeout_note: bool
    metrics_port: int | None
    metrics_host: str
    tracing: bool
    multiproc_dir: str | os.PathLike[str] | None
    multiproc_interval_seconds: float
    ui: Literal["never", "token", "always"]
    ui_path: str
    ui_token: str | SecretStr | None
    server_connections_max: int | Literal["off"] | None


def build_settings(overrides: Mapping[str, Any]) -> PoolWatchSettings:
    """Build settings, turning pydantic's report into one message that names the setting."""
    warn_about_unknown_variables(os.environ)
    try:
        settings = PoolWatchSettings(**overrides)
    except ValidationError as error:
        raise ValueError(_describe(error)) from None
    if settings.health_details == "token" and settings.health_token is None:
        raise ValueError(
            "poolwatch: invalid setting health_token (POOLWATCH_HEALTH_TOKEN): "
            "required when health_details is 'token'"
        )
    secret = settings.ui_secret
    if settings.ui == "token" and (secret is None or not secret.get_secret_value().strip()):
        raise ValueError(
            "poolwatch: invalid setting ui_token (POOLWATCH_UI_TOKEN): a non-empty token is required "
            "when ui is 'token' (or set health_token, POOLWATCH_HEALTH_TOKEN, which the live page "
            "then uses)"
        )
    if settings.multiproc_dir is not None:
        _check_multiproc_dir(settings.multiproc_dir, overrides)
    return settings


def _check_multiproc_dir(directory: Path, overrides: Mapping[str, Any]) -> None:
    """The shared directory exists (or can be made) and takes files: say so now, by name, rather
    than let a worker's first publication fail with a bare FileExistsError."""
    problem = None
    if directory.exists() and not directory.is_dir():
        problem = "it exists and is not a directory"
    else:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            handle, probe = tempfile.mkstemp(prefix=".poolwatch-check-", suffix=".tmp", dir=directory)
            os.close(handle)
            os.unlink(probe)
        except OSError as error:
            problem = f"cannot create it or write a file in it: {error.strerror or type(error).__name__}"
    if problem is None:
        return
    source = ""
    if "multiproc_dir" not in overrides and not _in_environment("POOLWATCH_MULTIPROC_DIR"):
        source = ", taken from PROMETHEUS_MULTIPROC_DIR"
    raise ValueError(
        f"poolwatch: invalid setting multiproc_dir (POOLWATCH_MULTIPROC_DIR): {problem} "
        f"(got {str(directory)!r}{source})"
    )


def _in_environment(name: str) -> bool:
    # pydantic-settings reads the environment case-insensitively.
    return any(key.upper() == name for key in os.environ)


# -- POOLWATCH_* variables that name no setting ----------------------------------------------------

_reported_variables: set[str] = set()
_reported_lock = threading.Lock()


def setting_variables() -> dict[str, str]:
    """Every ``POOLWATCH_*`` variable a setting is read from, to the setting's name.

    Only ``multiproc_dir`` has aliases, and the one that starts with ``POOLWATCH_`` is its own
    name's variable; a new alias with that prefix must be added here.
    """
    return {ENV_PREFIX + name.upper(): name for name in PoolWatchSettings.model_fields}


def warn_about_unknown_variables(environment: Any) -> None:
    """One ``poolwatch.unknown_setting`` warning per process for each ``POOLWATCH_*`` variable that
    names no setting (a misspelt one would otherwise be ignored without a word)."""
    known = setting_variables()
    for key in list(environment):
        variable = str(key).upper()
        if not variable.startswith(ENV_PREFIX) or variable in known or variable in NOT_SETTINGS:
            continue
        with _reported_lock:
            if variable in _reported_variables:
                continue
            _reported_variables.add(variable)
        fields: dict[str, Any] = {"variable": str(key)}
        closest = closest_setting(variable[len(ENV_PREFIX) :].lower())
        if closest is not None:
            fields["closest"] = f"{closest} ({ENV_PREFIX}{closest.upper()})"
        try:
            logger.warning("poolwatch.unknown_setting", **fields)
        except Exception as error:  # a log call must never stop start-up
            internal_errors.record("unknown_setting", error)


def closest_setting(name: str) -> str | None:
    matches = difflib.get_close_matches(name, list(PoolWatchSettings.model_fields), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"]) or "settings"
        if item["type"] == "extra_forbidden":
            closest = closest_setting(name)
            hint = f" (did you mean {closest!r}?)" if closest is not None else ""
            problems.append(f"unknown setting {name!r}{hint}")
        else:
            # A secret that failed validation must not be echoed back.
            shown = "" if "token" in name else f" (got {item.get('input')!r})"
            problems.append(f"invalid setting {name} (POOLWATCH_{name.upper()}): {item['msg']}{shown}")
    return "poolwatch: " + "; ".join(problems)
