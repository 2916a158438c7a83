"""Notable facts about a pool, as small frozen values handed to sinks (stamina's seam).

The recorder, the leak sweeper, the statement timer and health build one of these where something
worth telling happened, always outside the recorder's lock, and call :func:`emit`, which hands it
to every sink in turn. A sink is any callable taking an event. The default is ``_log.log_sink``:
structlog when the application has configured it, stdlib ``logging`` otherwise (``_log`` also has
each of the two alone). Each event knows its log name, level and fields (``fields()``), so every
log sink writes the same event; other sinks (a live page, a test helper) read the typed attributes.

Events are rare (leaks, timeouts, slow statements, health changes): nothing here runs per checkout.
Configuration notices (a misspelt setting, a taken path) are not pool facts and are logged directly.
"""

from __future__ import annotations

import functools
import os
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from types import CodeType
from typing import Any, ClassVar, Literal, Protocol

from .._log import internal_errors, log_sink

Level = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True, slots=True)
class LeakDetected:
    """A checkout held past the leak threshold; reported once per checkout."""

    name: ClassVar[str] = "poolwatch.leak_detected"
    level: ClassVar[Level] = "warning"

    pool: str
    route: str
    seconds_held: float
    threshold_seconds: float
    site: str  # file:line of the application code that took the connection
    function: str
    stack: str | None = None  # the whole borrow stack, with leak_capture_stack
    # Of seconds_held, the time spent waiting on the database so far (statements, failed ones too,
    # and row fetches on server-side cursors): held while idle is the difference.
    seconds_in_statements: float = 0.0
    statements: int = 0

    def fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "pool": self.pool,
            "route": self.route,
            "seconds_held": round(self.seconds_held, 3),
            "seconds_in_statements": round(self.seconds_in_statements, 3),
            "statements": self.statements,
            "threshold_seconds": self.threshold_seconds,
            "site": self.site,
            "function": self.function,
        }
        if self.stack is not None:
            fields["stack"] = self.stack
        return fields


@dataclass(frozen=True, slots=True)
class LeakReturned:
    """A checkout reported as a leak came back to the pool."""

    name: ClassVar[str] = "poolwatch.leak_returned"
    level: ClassVar[Level] = "info"

    pool: str
    route: str
    seconds_held: float
    site: str
    function: str

    def fields(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "route": self.route,
            "seconds_held": round(self.seconds_held, 3),
            "site": self.site,
            "function": self.function,
        }


@dataclass(frozen=True, slots=True)
class HeldIdle:
    """One checkout held its connection without waiting on the database (no statement running, no
    rows being fetched from a server-side cursor, failed and cancelled statements included) for
    longer than ``held_idle_seconds``: an awaited HTTP call, a sleep or template rendering inside a
    session, or work done between the rows of a stream."""

    name: ClassVar[str] = "poolwatch.held_idle"
    level: ClassVar[Level] = "warning"

    pool: str
    route: str
    method: str
    seconds_held: float
    seconds_idle: float  # seconds_held minus the time waiting on the database
    threshold_seconds: float
    statements: int
    site: str
    function: str

    def fields(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "route": self.route,
            "method": self.method,
            "seconds_held": round(self.seconds_held, 3),
            "seconds_idle": round(self.seconds_idle, 3),
            "threshold_seconds": self.threshold_seconds,
            "statements": self.statements,
            "site": self.site,
            "function": self.function,
        }


@dataclass(frozen=True, slots=True)
class IdleInTransaction:
    """One checkout sat idle inside an open transaction (no statement running, a transaction
    begun and not yet committed or rolled back) for longer than ``idle_in_transaction_seconds``,
    summed over the checkout. Such a session holds its locks and its snapshot, which keeps vacuum
    from cleaning up; PostgreSQL's ``idle_in_transaction_session_timeout`` kills it without
    saying which code opened it. Read from the driver without a round trip."""

    name: ClassVar[str] = "poolwatch.idle_in_transaction"
    level: ClassVar[Level] = "warning"

    pool: str
    route: str
    method: str
    seconds_held: float
    seconds_idle_in_transaction: float
    threshold_seconds: float
    statements: int
    site: str
    function: str

    def fields(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "route": self.route,
            "method": self.method,
            "seconds_held": round(self.seconds_held, 3),
            "seconds_idle_in_transaction": round(self.seconds_idle_in_transaction, 3),
            "threshold_seconds": self.threshold_seconds,
            "statements": self.statements,
            "site": self.site,
            "function": self.function,
        }


@dataclass(frozen=True, slots=True)
class HeldDuringResponse:
    """A connection taken before a streaming, SSE or file response started stayed out for longer
    than ``held_during_response_seconds`` after it started: almost always a dependency with
    ``yield`` whose session lives until the response body ends."""

    name: ClassVar[str] = "poolwatch.held_during_response"
    level: ClassVar[Level] = "warning"

    pool: str
    route: str
    method: str
    response: str  # "sse", "streaming" or "file"
    seconds_held: float
    seconds_after_response_started: float
    threshold_seconds: float
    site: str
    function: str
    likely_cause: str

    def fields(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "route": self.route,
            "method": self.method,
            "response": self.response,
            "seconds_held": round(self.seconds_held, 3),
            "seconds_after_response_started": round(self.seconds_after_response_started, 3),
            "threshold_seconds": self.threshold_seconds,
            "site": self.site,
            "function": self.function,
            "likely_cause": self.likely_cause,
        }


@dataclass(frozen=True, slots=True)
class GcReclaimed:
    """A checkout was never returned: the garbage collector gave the connection back."""

    name: ClassVar[str] = "poolwatch.gc_reclaimed"
    level: ClassVar[Level] = "error"

    pool: str
    route: str
    seconds_held: float
    site: str
    function: str
    stack: str | None = None

    def fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "pool": self.pool,
            "route": self.route,
            "seconds_held": round(self.seconds_held, 3),
            "site": self.site,
            "function": self.function,
        }
        if self.stack is not None:
            fields["stack"] = self.stack
        return fields


@dataclass(frozen=True, slots=True)
class PoolTimeout:
    """A checkout gave up: the pool's limit was reached for ``pool_timeout``."""

    name: ClassVar[str] = "poolwatch.pool_timeout"
    level: ClassVar[Level] = "warning"

    pool: str
    seconds_waited: float
    pool_size: int | None  # None for pools without a size
    max_overflow: int | None
    overflow: int
    checked_out: int | None
    callers_waiting: int  # this caller included
    route: str = "<none>"  # the route that gave up

    def fields(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "route": self.route,
            "seconds_waited": round(self.seconds_waited, 3),
            "pool_size": self.pool_size,
            "max_overflow": self.max_overflow,
            "overflow": self.overflow,
            "checked_out": self.checked_out,
            "callers_waiting": self.callers_waiting,
        }


@dataclass(frozen=True, slots=True)
class PrePingFailed:
    """The pool's pre-ping found a dead connection."""

    name: ClassVar[str] = "poolwatch.pre_ping_failed"
    level: ClassVar[Level] = "warning"

    pool: str
    error: str  # the exception's class name, never its message

    def fields(self) -> dict[str, Any]:
        return {"pool": self.pool, "error": self.error}


@dataclass(frozen=True, slots=True)
class SlowQuery:
    """A statement took at least ``slow_query_seconds``."""

    name: ClassVar[str] = "poolwatch.slow_query"
    level: ClassVar[Level] = "warning"

    pool: str
    route: str
    operation: str
    seconds: float
    threshold_seconds: float
    fingerprint: str  # the statement with its literals replaced by ``?``

    def fields(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "route": self.route,
            "operation": self.operation,
            "seconds": round(self.seconds, 4),
            "threshold_seconds": self.threshold_seconds,
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True, slots=True)
class HealthChanged:
    """A pool's reported health changed (one event per change, not per probe)."""

    name: ClassVar[str] = "poolwatch.health_changed"

    pool: str
    status: str
    previous: str
    used: int
    max: int | None
    pending: int
    error: str | None = None

    @property
    def level(self) -> Level:
        return "info" if self.status == "ok" else "warning"

    def fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "pool": self.pool,
            "status": self.status,
            "previous": self.previous,
            "used": self.used,
            "max": self.max,
            "pending": self.pending,
        }
        if self.error is not None:
            fields["error"] = self.error
        return fields


@dataclass(frozen=True, slots=True)
class ThreadpoolStarvation:
    """Callers wait for a pool while every AnyIO worker-thread token is taken, tasks wait for one,
    and no connection came back for a while: the sync-endpoint deadlock. Once per episode."""

    name: ClassVar[str] = "poolwatch.threadpool_starvation"
    level: ClassVar[Level] = "error"

    pool: str
    threads_busy: int
    threads_waiting: int
    threads_capacity: float  # AnyIO's total tokens (an int, or inf)
    callers_waiting: int
    checked_out: int
    seconds_without_checkin: float
    routes: dict[str, int]  # route -> connections it holds now

    def fields(self) -> dict[str, Any]:
        capacity = self.threads_capacity
        return {
            "pool": self.pool,
            "threads_busy": self.threads_busy,
            "threads_waiting": self.threads_waiting,
            "threads_capacity": int(capacity) if capacity.is_integer() else capacity,
            "callers_waiting": self.callers_waiting,
            "checked_out": self.checked_out,
            "seconds_without_checkin": round(self.seconds_without_checkin, 1),
            "routes": dict(self.routes),
        }


Event = (
    LeakDetected | LeakReturned | HeldIdle | GcReclaimed | PoolTimeout | PrePingFailed | SlowQuery
    | HealthChanged | ThreadpoolStarvation | IdleInTransaction | HeldDuringResponse
)  # fmt: skip
EVENT_TYPES: tuple[type[Event], ...] = (
    LeakDetected, LeakReturned, HeldIdle, GcReclaimed, PoolTimeout, PrePingFailed, SlowQuery, HealthChanged,
    ThreadpoolStarvation, IdleInTransaction, HeldDuringResponse,
)  # fmt: skip


class Sink(Protocol):
    """Anything that takes an event; it must not block (leak events come from the checkin path)."""

    def __call__(self, event: Event, /) -> None: ...


DEFAULT_SINKS: tuple[Sink, ...] = (log_sink,)
_sinks: tuple[Sink, ...] = DEFAULT_SINKS


def set_sinks(sinks: Iterable[Sink] | None) -> tuple[Sink, ...]:
    """Send events to ``sinks`` from now on (None: the default log sinks); returns the previous
    ones. A tuple is swapped whole, so an event being emitted meanwhile sees one set or the other."""
    global _sinks
    previous = _sinks
    _sinks = DEFAULT_SINKS if sinks is None else tuple(sinks)
    return previous


def get_sinks() -> tuple[Sink, ...]:
    return _sinks


# The last events with their wall-clock time, for the live page. Kept here rather than as a sink so
# that an application replacing the sinks (set_sinks) still gets a page that tells what happened.
# Bounded, and an append is one atomic C call: safe from any thread, the garbage collector's too.
RECENT_EVENTS_KEPT = 200
recent_events: deque[tuple[float, Event]] = deque(maxlen=RECENT_EVENTS_KEPT)


def recent() -> list[tuple[float, Event]]:
    """A copy of the recent events, oldest first.

    Copying a deque iterates it, and an event emitted meanwhile (by another thread, or by a
    checkin the garbage collector runs inside this very copy) makes the iteration fail; a retry
    almost always succeeds, and an empty answer is better than a reader that raises.
    """
    for _ in range(5):
        try:
            return list(recent_events)
        except RuntimeError:
            continue
    return []


def emit(event: Event) -> None:
    """Hand ``event`` to every sink; a failing sink is counted and never stops the others."""
    recent_events.append((time.time(), event))
    for sink in _sinks:
        try:
            sink(event)
        except Exception as error:
            internal_errors.record("event_sink", error)


def describe_site(site: tuple[CodeType, int] | None) -> tuple[str, str]:
    """(``file:line``, function) of a site kept as (code, instruction offset); the file as
    :func:`shown_path` gives it."""
    if site is None:
        return "<unknown>", "<unknown>"
    code, offset = site
    return f"{shown_path(code.co_filename)}:{line_of(code, offset)}", code.co_qualname


# The application's root: a site under it is shown relative to it (``demo_app/api.py:23``, not
# ``/srv/app/demo_app/api.py:23``), as pytest shows paths relative to its rootdir. It is the working
# directory when poolwatch first watched an engine (``uvicorn app:app`` and pytest run from the
# project), else when a site was first described. None: not known yet; "": none (the filesystem's
# root, where a daemon may have gone, makes nothing shorter).
_application_root: str | None = None


def remember_application_root() -> None:
    """Take the working directory as the application's root, unless one is known already."""
    if _application_root is None:
        try:
            directory = os.getcwd()
        except OSError:  # the working directory was removed
            directory = ""
        set_application_root(directory)


def set_application_root(directory: str | None) -> None:
    global _application_root
    root = os.path.realpath(directory) if directory else ""
    _application_root = "" if root in ("", os.sep) else root.rstrip(os.sep) + os.sep
    shown_path.cache_clear()


@functools.lru_cache(maxsize=4096)
def shown_path(filename: str) -> str:
    """A source file as a person reads it: an installed package's file from its package
    (``sqlalchemy/orm/session.py``), the application's relative to its root, anything else whole."""
    for packages in ("site-packages", "dist-packages"):
        _, marker, inside = filename.rpartition(os.sep + packages + os.sep)
        if marker:
            return inside
    if _application_root is None:
        remember_application_root()
    root = _application_root
    if not root or filename.startswith("<"):  # generated code: <string>, <frozen ...>
        return filename
    if filename.startswith(root):
        return filename[len(root) :]
    real = os.path.realpath(filename)  # a symlinked checkout: the root is a real path
    return real[len(root) :] if real.startswith(root) else filename


def line_of(code: CodeType, offset: int) -> int | None:
    """The source line of an instruction offset; what ``frame.f_lineno`` would have said.

    Kept lazy because ``f_lineno`` decodes the code object's line table on every call, a cost
    that grows with the function's length; a checkout keeps the offset and a leak report, which is
    rare, pays for the decoding.
    """
    for start, end, line in code.co_lines():
        if start <= offset < end:
            return line
    return code.co_firstlineno
