"""Log sinks for the person on call, and the swallow-and-count rule for our own failures.

poolwatch never configures structlog or logging. Where an event goes is decided at each event,
because an application may configure structlog after importing poolwatch (and
``structlog.testing.capture_logs`` configures it):

- **structlog configured** (``structlog.is_configured()``): through
  ``structlog.get_logger("poolwatch")``, exactly as always: the event name and its fields as keys.
- **otherwise** to the stdlib ``logging`` logger ``poolwatch``, at the event's level, so an
  application that logs through ``logging`` (and Sentry's logging integration) gets the events with
  its own handlers. They stay structured: the message reads ``poolwatch.leak_detected pool=primary
  route=/users/{user_id} ...``, built from a template of the keys (one template per event, so
  Sentry groups by event) and the values as arguments; the record also carries
  ``record.event`` (the name) and ``record.poolwatch`` (the fields as a dict).

An unconfigured structlog would print every event to stdout; stdlib logging with nothing configured
prints warnings and errors to stderr (its last-resort handler) and drops the rest.

Pool events (``poolwatch._record.events``) reach these paths as sinks: ``log_sink`` (the default)
decides per event, ``structlog_sink`` and ``logging_sink`` take one path each. A sink needs only an
event's ``name``, ``level`` and ``fields()``, so this module, imported by every other, imports none.
Configuration notices and ``internal_errors`` go through ``logger``, the same two paths.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, Protocol, TypeVar

import structlog

_structlog_logger: Any = structlog.get_logger("poolwatch")
stdlib_logger = logging.getLogger("poolwatch")

# Values that need no quoting in the key=value message; anything else is written as a JSON string.
_BARE_VALUE = re.compile(r"[^\s\"=\\]+")


def _value_text(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if _BARE_VALUE.fullmatch(text) else json.dumps(text)


class LogEvent(Protocol):
    """What a log sink needs from an event."""

    @property
    def name(self) -> str: ...

    @property
    def level(self) -> str:
        """``debug``, ``info``, ``warning`` or ``error``."""
        ...

    def fields(self) -> dict[str, Any]: ...


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def log_sink(event: LogEvent) -> None:
    """The default: structlog if the application configured it, else stdlib logging."""
    if structlog.is_configured():
        getattr(_structlog_logger, event.level)(event.name, **event.fields())
    else:
        _to_logging(_LEVELS[event.level], event.name, event.fields())


def structlog_sink(event: LogEvent) -> None:
    """Through ``structlog.get_logger("poolwatch")``: the event name, and its fields as keys."""
    getattr(_structlog_logger, event.level)(event.name, **event.fields())


def logging_sink(event: LogEvent) -> None:
    """Through the stdlib logger ``poolwatch``, structured as the module docstring says."""
    _to_logging(_LEVELS[event.level], event.name, event.fields())


def _to_logging(level: int, event: str, fields: dict[str, Any]) -> None:
    if not stdlib_logger.isEnabledFor(level):
        return
    exc_info = fields.pop("exc_info", None)
    template = " ".join([event, *(f"{key}=%s" for key in fields)])
    stdlib_logger.log(
        level,
        template,
        *(_value_text(value) for value in fields.values()),
        exc_info=exc_info,
        extra={"event": event, "poolwatch": fields},
        # The record names the poolwatch function that logged (the caller of ``emit`` or of
        # ``logger.warning``), not this module: both are three frames up from here.
        stacklevel=4,
    )


class EventLogger:
    """``logger.warning("poolwatch.x", field=value)``: to structlog if configured, else to logging."""

    def debug(self, event: str, **fields: Any) -> None:
        self._emit("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)

    def _emit(self, method: str, event: str, fields: dict[str, Any]) -> None:
        if structlog.is_configured():
            getattr(_structlog_logger, method)(event, **fields)
        else:
            _to_logging(_LEVELS[method], event, fields)


logger = EventLogger()

P = ParamSpec("P")
R = TypeVar("R")


class InternalErrors:
    """Process-wide count of poolwatch's own swallowed failures; each site is logged once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._logged_sites: set[str] = set()

    @property
    def count(self) -> int:
        return self._count

    def record(self, site: str, error: BaseException) -> None:
        with self._lock:
            self._count += 1
            first_time = site not in self._logged_sites
            self._logged_sites.add(site)
        if first_time:
            # If logging itself fails there is nothing safer left to do than to stay quiet.
            with contextlib.suppress(Exception):
                logger.error(
                    "poolwatch.internal_error",
                    site=site,
                    error=type(error).__name__,
                    exc_info=error,
                )


internal_errors = InternalErrors()


def swallowing(site: str) -> Callable[[Callable[P, R]], Callable[P, R | None]]:
    """Decorate a hook so a failure inside it is counted instead of reaching the application."""

    def decorate(function: Callable[P, R]) -> Callable[P, R | None]:
        @functools.wraps(function)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R | None:
            try:
                return function(*args, **kwargs)
            except Exception as error:
                internal_errors.record(site, error)
                return None

        return guarded

    return decorate
