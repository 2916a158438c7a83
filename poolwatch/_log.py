"""structlog events for the person on call, and the swallow-and-count rule for our own failures.

poolwatch never configures structlog or logging: it only asks for a logger, so events go wherever
the application sends them.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import structlog

logger: Any = structlog.get_logger("poolwatch")

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
