"""``/health/live`` and ``/health/db`` for orchestrators.

``/health/live`` never touches a database: it answers whenever the process serves, so a database
outage never gets healthy pods restarted. ``/health/db`` answers within its own deadline from the
pools' state and a single-flight, cached probe (``probe``): 200 ``ok``; 200 ``degraded`` for a
saturated pool (a full pool with callers queued that still makes progress, or a probe that is slow
to answer), or 503 ``saturated`` when the operator asks for that; 503 ``down`` when a probe fails
outright or the pool made no progress at all for the stall window. The worst pool decides.

Saturated answers 200 by default because readiness that fails on load takes pods out exactly when
the others are loaded too: fewer pods, more load on each, and every pod goes out.

Per-pool details appear only when the settings allow; the query string is never read.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import TYPE_CHECKING, Any

from .._log import internal_errors
from .._record.events import HealthChanged, emit
from .http import (
    READ_METHODS,
    Receive,
    Rendered,
    Scope,
    Send,
    asgi_response,
    header,
    json_rendered,
    method_not_allowed,
)
from .probe import PoolHealth, Status, check_pool, note_reported

if TYPE_CHECKING:
    from .._record.recorder import PoolRecorder
    from .watched import Watched

_SEVERITY: dict[Status, int] = {"ok": 0, "saturated": 1, "down": 2}


class HealthEndpoints:
    def __init__(self, watch: Watched, *, probe_async_pools: bool = True) -> None:
        self.watch = watch
        # False where no event loop is known to own the AsyncEngines' connections (the sidecar
        # without one): those pools are then answered from their state alone, never probed.
        self.probe_async_pools = probe_async_pools

    # -- rendered once, from the method and the Authorization header --------------------------

    async def answer_live(self, method: str, authorization: str | None = None) -> Rendered:
        if method not in READ_METHODS:
            return method_not_allowed()
        return json_rendered(200, {"status": "ok"})

    async def answer_db(self, method: str, authorization: str | None = None) -> Rendered:
        if method not in READ_METHODS:
            return method_not_allowed()
        try:
            status_code, payload = await self._check(authorization)
        except Exception as error:
            internal_errors.record("health_db", error)
            status_code, payload = 503, {"status": "down"}
        return json_rendered(status_code, payload)

    # -- ASGI ---------------------------------------------------------------------------------

    async def live(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method", "GET")
        await asgi_response(await self.answer_live(method), method)(scope, receive, send)

    async def db(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method", "GET")
        rendered = await self.answer_db(method, header(scope, "authorization"))
        await asgi_response(rendered, method)(scope, receive, send)

    async def _check(self, authorization: str | None) -> tuple[int, dict[str, Any]]:
        settings = self.watch.settings
        deadline = settings.health_deadline_seconds
        deadline_at = time.monotonic() + deadline
        recorders = self.watch.recorders
        answers = await asyncio.gather(
            *(
                check_pool(
                    recorder,
                    deadline_at,
                    deadline,
                    settings.health_cache_seconds,
                    stall_seconds=settings.health_stall_seconds,
                    probe=self._may_probe(recorder),
                )
                for recorder in recorders
            )
        )
        worst: Status = "ok"
        for recorder, answer in zip(recorders, answers, strict=True):
            _log_change(recorder, answer)
            if self._may_probe(recorder):  # never on a loop that does not own its connections
                # The server's connection limit, read apart from this answer and never in its way
                # (by the pool library's own room in _capture; a library without one reads none).
                ensure_limit_read = getattr(recorder.source, "ensure_limit_read", None)
                if ensure_limit_read is not None:
                    ensure_limit_read(recorder)
            if _SEVERITY[answer.status] > _SEVERITY[worst]:
                worst = answer.status
        if worst == "ok":
            status_code, shown = 200, "ok"
        elif worst == "saturated" and settings.health_saturated_status == 200:
            status_code, shown = 200, "degraded"
        else:
            status_code, shown = 503, worst
        payload: dict[str, Any] = {"status": shown}
        if self._details_allowed(authorization):
            payload["pools"] = {
                recorder.name: _details(answer) for recorder, answer in zip(recorders, answers, strict=True)
            }
        return status_code, payload

    def _may_probe(self, recorder: PoolRecorder) -> bool:
        if self.probe_async_pools:
            return True
        return not recorder.source.is_async

    def _details_allowed(self, authorization: str | None) -> bool:
        settings = self.watch.settings
        if settings.health_details == "always":
            return True
        if settings.health_details != "token" or settings.health_token is None:
            return False
        # header() gives None for an oversized value; anything but "Bearer <token>" is no token.
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
    if answer.not_probed is not None:
        details["probe"] = answer.not_probed
    return details


def _log_change(recorder: PoolRecorder, answer: PoolHealth) -> None:
    """One event when a pool's reported health changes, not one per probe."""
    previous = note_reported(recorder, answer.status)
    if previous is None:
        return
    change = HealthChanged(
        pool=recorder.name,
        status=answer.status,
        previous=previous,
        used=answer.state.used,
        max=answer.state.max,
        pending=answer.pending,
        error=answer.error,
    )
    emit(change)
