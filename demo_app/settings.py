"""Demo configuration from the environment: the database and the pool's knobs."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# The embedded default: a SQLite file beside the demo, so a fresh machine needs no server.
DEFAULT_DATABASE_URL = f"sqlite+aiosqlite:///{Path(__file__).parent / 'demo.db'}"


class DemoSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore")

    database_url: str = Field(DEFAULT_DATABASE_URL, validation_alias="DATABASE_URL")
    pool_size: int = Field(5, ge=1, validation_alias="POOL_SIZE")
    max_overflow: int = Field(5, ge=0, validation_alias="POOL_MAX_OVERFLOW")
    pool_timeout: float = Field(5.0, gt=0, validation_alias="POOL_TIMEOUT")
    pool_recycle: int = Field(1800, ge=-1, validation_alias="POOL_RECYCLE")
    pool_pre_ping: bool = Field(True, validation_alias="POOL_PRE_PING")
    # On by default: the /misbehave endpoints exist to show poolwatch catching real problems, and
    # they only misbehave when called. DEMO_MISBEHAVE=false leaves a clean API.
    misbehave: bool = Field(True, validation_alias="DEMO_MISBEHAVE")

    @property
    def async_database_url(self) -> str:
        """DATABASE_URL as given, with plain postgresql:// URLs sent through asyncpg."""
        url = self.database_url
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+asyncpg://" + url[len(prefix) :]
        return url
