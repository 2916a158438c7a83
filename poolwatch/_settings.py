"""Settings: one pydantic-settings class, read from ``POOLWATCH_*`` and overridable by keyword."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    metrics_path: str = "/metrics"
    health_db_path: str = "/health/db"
    health_live_path: str = "/health/live"
    health_deadline_seconds: float = Field(0.5, gt=0, le=60, allow_inf_nan=False)
    health_cache_seconds: float = Field(2.0, ge=0, le=3600, allow_inf_nan=False)
    health_details: Literal["never", "token", "always"] = "never"
    health_token: SecretStr | None = None
    health_saturated_status: Literal[503, 200] = 503
    metrics_port: int | None = Field(None, ge=1, le=65535)
    metrics_host: str = Field("0.0.0.0", min_length=1)
    tracing: bool = False
    # Multi-worker servers: where workers share their numbers (see _multiprocess); prometheus_client's
    # own PROMETHEUS_MULTIPROC_DIR is taken when poolwatch's is not set.
    multiproc_dir: Path | None = Field(
        None,
        validation_alias=AliasChoices(
            "multiproc_dir", "POOLWATCH_MULTIPROC_DIR", "PROMETHEUS_MULTIPROC_DIR"
        ),
    )
    multiproc_interval_seconds: float = Field(1.0, ge=0.01, le=3600, allow_inf_nan=False)

    @field_validator("metrics_path", "health_db_path", "health_live_path")
    @classmethod
    def _path_is_absolute(cls, value: str) -> str:
        if not value.startswith("/") or any(c.isspace() for c in value):
            raise ValueError("must be an absolute URL path such as '/metrics'")
        return value


def build_settings(overrides: dict[str, Any]) -> PoolWatchSettings:
    """Build settings, turning pydantic's report into one message that names the setting."""
    try:
        settings = PoolWatchSettings(**overrides)
    except ValidationError as error:
        raise ValueError(_describe(error)) from None
    if settings.health_details == "token" and settings.health_token is None:
        raise ValueError(
            "poolwatch: invalid setting health_token (POOLWATCH_HEALTH_TOKEN): "
            "required when health_details is 'token'"
        )
    return settings


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"]) or "settings"
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown setting {name!r}")
        else:
            # A secret that failed validation must not be echoed back.
            shown = "" if "token" in name else f" (got {item.get('input')!r})"
            problems.append(
                f"invalid setting {name} (POOLWATCH_{name.upper()}): {item['msg']}{shown}"
            )
    return "poolwatch: " + "; ".join(problems)
