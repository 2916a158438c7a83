"""What a recorder needs to know of the pool it counts, whatever library made the pool.

Each pool library's room in ``_capture`` (SQLAlchemy's engines, asyncpg's ``Pool``, psycopg_pool's
pools) gives its recorder a ``PoolSource``: the labels that name the pool, its state read at scrape
time, and the four steps of a health probe. ``_record`` and ``_serve`` talk to pools only through
it, so neither imports SQLAlchemy or a driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class PoolState:
    # Checkouts handed out now: the table of live checkouts, so the gauge agrees with the checkouts
    # the live page lists.
    used: int
    idle: int
    overflow: int
    max: int | None
    # Slots taken now, as the pool counts them: the handed-out ones plus callers still opening or
    # pre-pinging the connection of the slot they took. Whether the pool is full is judged on this.
    taken: int = 0


class PoolSource(Protocol):
    """One watched pool, as ``_record`` and ``_serve`` see it."""

    # "sqlalchemy", "asyncpg" or "psycopg_pool".
    library: str
    dialect: str
    driver: str
    # host:port/database, never a user or password (``_record.server.server_label``).
    server: str
    # A keyed hash of the user name (``_record.server.role_tag``).
    role: str
    # Whether the pool's connections belong to an event loop (probed there, never from a thread).
    is_async: bool
    # Metric families this library cannot give (absent from the exposition, never a made-up zero);
    # a source without the attribute gives them all.
    unavailable: frozenset[str]

    @property
    def engine(self) -> Any:
        """SQLAlchemy's Engine for SQLAlchemy pools (None once collected); None for the others."""

    @property
    def pool(self) -> Any:
        """The library's pool object (None once collected)."""

    @property
    def pool_class(self) -> str:
        """The ``pool_class`` label: SQLAlchemy's class name, else ``library.Class``."""

    def read_state(self, live_count: int) -> PoolState:
        """Used, idle, overflow, max and taken now; ``live_count`` is the checkout table's size."""

    def never_probed(self) -> bool:
        """Whether a probe would disturb the application (SQLAlchemy's StaticPool, say)."""

    # A probe attempt, in the steps ``_serve.probe`` needs (async or sync as ``is_async`` says):
    # take a connection from the pool, ping it, give it back, or throw it away after a failure.
    async def checkout_async(self) -> Any: ...
    async def ping_async(self, connection: Any) -> bool: ...
    async def release_async(self, connection: Any) -> None: ...
    def checkout_sync(self) -> Any: ...
    def ping_sync(self, connection: Any) -> bool: ...
    def release_sync(self, connection: Any) -> None: ...
    def discard(self, connection: Any) -> None:
        """Throw a connection away without waiting on it; swallows and counts its own failures."""
