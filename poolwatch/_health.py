"""``/health/live`` and ``/health/db`` for orchestrators.

``/health/live`` never touches a database: it answers whenever the process serves, so a database
outage never gets healthy pods restarted. ``/health/db`` answers within its own deadline from the
pools' state and a single-flight, cached probe (``_probe``): 200 ``ok``, 503 ``down``, and 503
``saturated`` (or 200 ``degraded``, as configured) for a pool with no free connection and callers
waiting. Per-pool details appear only when the settings allow; the query string is never read.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import TYPE_CHECKING, Any

from ._asgi import Receive, Scope, Send, header, method_not_allowed, respond_json
from ._log import internal_errors, logger
from ._probe import PoolHealth, Status, check_pool, note_reported

if TYPE_CHECKING:
    from ._core import PoolWatch
    from ._recorder import PoolRecorder

_SEVERITY: dict[Status, int] = {"ok": 0, "saturated": 1, "down": 2}


class HealthEndpoints:
    def __init__(self, watch: PoolWatch) -> None:
        self.watch = watch

    async def live(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await method_not_allowed(send)
            return
        await respond_json(send, 200, {"status": "ok"}, head_only=method == "HEAD")

    async def db(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await method_not_allowed(send)
            return
        try:
            status_code, payload = await self._check(scope)
        except Exception as error:
            internal_errors.record("health_db", error)
            status_code, payload = 503, {"status": "down"}
        await respond_json(send, status_code, payload, head_only=method == "HEAD")

    async def _check(self, scope: Scope) -> tuple[int, dict[str, Any]]:
        settings = self.watch.settings
        deadline = settings.health_deadline_seconds
        deadline_at = time.monotonic() + deadline
        recorders = self.watch.recorders
        answers = await asyncio.gather(
            *(
                check_pool(recorder, deadline_at, deadline, settings.health_cache_seconds)
                for recorder in recorders
            )
        )
        worst: Status = "ok"
        for recorder, answer in zip(recorders, answers, strict=True):
            _log_change(recorder, answer)
            if _SEVERITY[answer.status] > _SEVERITY[worst]:
                worst = answer.status
        if worst == "ok":
            status_code, shown = 200, "ok"
        elif worst == "saturated" and settings.health_saturated_status == 200:
            status_code, shown = 200, "degraded"
        else:
            status_code, shown = 503, worst
        payload: dict[str, Any] = {"status": shown}
        if self._details_allowed(scope):
            payload["pools"] = {
                recorder.name: _details(answer) for recorder, answer in zip(recorders, answers, strict=True)
            }
        return status_code, payload

    def _details_allowed(self, scope: Scope) -> bool:
        settings = self.watch.settings
        if settings.health_details == "always":
            return True
        if settings.health_details != "token" or settings.health_token is None:
            return False
        # header() gives None for an oversized value; anything but "Bearer <token>" is no token.
        authorization = header(scope, b"authorization")
        if authorization is None:
            return False
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            return False
        expected = settings.health_token.get_secret_value().encode("utf-8")
        given = credentials.strip().encode("latin-1")
        return hmac.compare_digest(given, expected)


def _details(answer: PoolHealth) -> dict[str, Any]:
    details: dict[str, Any] = {
        "status": answer.status,
        "latency_seconds": None if answer.latency is None else round(answer.latency, 6),
        "used": answer.state.used,
        "idle": answer.state.idle,
        "max": answer.state.max,
        "pending": answer.pending,
    }
    if answer.error is not None:
        details["error"] = answer.error
    return details


def _log_change(recorder: PoolRecorder, answer: PoolHealth) -> None:
    """One event when a pool's reported health changes, not one per probe."""
    previous = note_reported(recorder, answer.status)
    if previous is None:
        return
    fields: dict[str, Any] = {
        "pool": recorder.name,
        "status": answer.status,
        "previous": previous,
        "used": answer.state.used,
        "max": answer.state.max,
        "pending": answer.pending,
    }
    if answer.error is not None:
        fields["error"] = answer.error
    if answer.status == "ok":
        logger.info("poolwatch.health_changed", **fields)
    else:
        logger.warning("poolwatch.health_changed", **fields)
