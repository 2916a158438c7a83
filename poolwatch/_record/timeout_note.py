"""The note a pool timeout carries: who holds the pool's connections at the moment it gave up.

HikariCP puts its pool's statistics into its acquire-timeout exception; this does the same for
SQLAlchemy's ``TimeoutError`` with a PEP 678 note, so the traceback in the application's own log
names the culprit (route, code site, age) with no dashboard open. The exception's type and message
stay as SQLAlchemy made them.

Building the note never blocks (no lock: a C-level copy of the checkout table, see the recorder)
and never raises (any failure is counted and the exception goes on without a note).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING

from .._log import internal_errors
from .context import route_label
from .events import describe_site

if TYPE_CHECKING:
    from .recorder import PoolRecorder

# Routes named in the note; the rest are summed up, so a note stays one readable paragraph.
MAX_ROUTES = 5
PREFIX = "poolwatch:"


def timeout_note(recorder: PoolRecorder) -> str:
    """``poolwatch: pool 'primary' has 5 connections out: 4 held by /reports/{id}, ...``."""
    entries = list(recorder.open_checkouts.values())
    now = time.perf_counter()
    out = len(entries)
    if not entries:
        return (
            f"{PREFIX} pool {recorder.name!r} had no checkout of its own out when this caller gave up "
            f"({recorder.pending} still queued); its connections are held by code that checked them "
            "out before poolwatch was installed, or are being opened or pre-pinged"
        )
    routes = Counter(route_label(entry[1]) for entry in entries)
    named = [f"{count} held by {route}" for route, count in routes.most_common(MAX_ROUTES)]
    others = sum(routes.values()) - sum(count for _, count in routes.most_common(MAX_ROUTES))
    if others:
        named.append(f"{others} by {len(routes) - MAX_ROUTES} other route(s)")
    oldest = min(entries, key=lambda entry: entry[0])
    site, function = describe_site(oldest[3])
    age = max(0.0, now - oldest[0])
    return (
        f"{PREFIX} pool {recorder.name!r} has {out} connection(s) out: {', '.join(named)}. "
        f"The oldest has been held {age:.1f} s by {route_label(oldest[1])}, taken at {site} in "
        f"{function}. {recorder.pending} other caller(s) still queued."
    )


def add_timeout_note(recorder: PoolRecorder, error: BaseException) -> None:
    """Attach the note to ``error``; on any failure, count it and leave the exception as it is."""
    try:
        error.add_note(timeout_note(recorder))
    except Exception as failure:
        internal_errors.record("timeout_note", failure)
