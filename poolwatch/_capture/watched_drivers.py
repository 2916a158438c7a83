"""What the rooms of the driver pools (asyncpg's, psycopg_pool's) share.

``recorders``: the recorders of the driver pools watched now. Each library's ``hook_pool`` adds its
recorder and ``unhook_pool`` takes it away; the test guard (``_guard``) reads their checkout tables.
A weak set: a recorder nobody watches any more goes.
"""

from __future__ import annotations

import weakref
from typing import Any

recorders: weakref.WeakSet[Any] = weakref.WeakSet()

# Families no driver pool gives: exported as absent, never as a made-up zero.
UNAVAILABLE = frozenset({
    "poolwatch_connections_pinging", "poolwatch_pre_ping_failures_total",  # neither pre-pings
    "poolwatch_gc_reclaimed_total",  # a lost connection is never returned by the collector
    "poolwatch_idle_in_transaction_seconds",  # transactions are followed on SQLAlchemy's pools only
    "poolwatch_held_after_response_seconds",
})  # fmt: skip


class UnsupportedVersion(RuntimeError):
    """A version of a pool library whose private seams poolwatch does not know."""


def check_version(
    library: str,
    version: str,
    supported: tuple[tuple[int, int], tuple[int, int]],
    missing: list[str],
    instead: str,
) -> None:
    """Refuse ``library`` at ``version`` outside ``supported`` (or missing a seam), saying so."""
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        major_minor = (-1, -1)
    low, high = supported
    if not low <= major_minor <= high or missing:
        raise UnsupportedVersion(
            f"poolwatch: {library} {version} is not supported (poolwatch watches {library}'s pool "
            f"for {library} {low[0]}.{low[1]} to {high[0]}.{high[1]}); pin {library} to that range, "
            f"or watch a SQLAlchemy engine over {instead} instead"
        )
