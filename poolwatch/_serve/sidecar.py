"""Sidecar mode: metrics and health on their own port (``metrics_port``), not the application's.

A small threading WSGI server (the kind prometheus_client's ``start_http_server`` runs) in a daemon
thread, started with the PoolWatch and stopped by ``PoolWatch.close()``. Metrics are rendered in that
thread, so they keep answering while the application's event loop is stuck. The middleware passes
these paths through to the application, which answers them like any unknown path (404).

Both answers are rendered by the same code as the middleware's (``answer_metrics`` and
``HealthEndpoints.answer_*``) and adapted to WSGI by ``http.wsgi_answer``. An AsyncEngine's pooled
connections belong to the event loop that opened them: an asyncpg connection used from another loop
or thread fails the application's own work on it ("another operation is in progress", "attached to
a different loop", worse). So health runs on the loop that owns them, with a bounded wait: the
application's loop once the middleware has seen it, else the loop that was running where the
sidecar was created (``watch()`` called from async code). With neither running, health runs on a
private loop in the server thread, where sync engines are probed as usual (their probe has its
own thread anyway) and async engines are answered from the pool's state alone, never probed; their
details say so (``"probe": "skipped: ..."``).

The bind address is ``POOLWATCH_METRICS_HOST`` (default ``0.0.0.0``: Prometheus scrapes the pod
from outside). Under a multi-worker server every worker binds the port with ``SO_REUSEPORT``; each
one answers for the whole service (see ``_multiprocess``), so it does not matter which one the
kernel picks.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import TimeoutError as FutureTimeout
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .._log import internal_errors
from .exposition import answer_metrics
from .health import HealthEndpoints
from .http import Rendered, StartResponse, environ_header, json_rendered, wsgi_answer

if TYPE_CHECKING:
    from .watched import Watched

# (method, Authorization header) -> the answer; HealthEndpoints.answer_db and answer_live.
Answer = Callable[[str, str | None], Coroutine[Any, Any, Rendered]]

# How long the sidecar waits for the application's loop beyond the health deadline before it
# answers 503 itself: a loop that cannot answer a probe this late is not serving.
LOOP_GRACE_SECONDS = 1.0


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _ReusePortServer(_Server):
    allow_reuse_port = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes and probes every few seconds would flood stderr."""


class SidecarServer:
    """Serves ``metrics_path`` and the health paths of one PoolWatch on ``port``."""

    def __init__(self, watch: Watched, port: int, *, reuse_port: bool = False) -> None:
        self.watch = watch
        settings = watch.settings
        health = HealthEndpoints(watch)
        self._metrics_path = settings.metrics_path
        paths = (settings.health_db_path, settings.health_live_path)
        self._health = _served(paths, (health.answer_db, health.answer_live))
        # Without a loop that owns their connections, async pools are not probed (see above).
        self._health_without_loop = _served(
            paths, (HealthEndpoints(watch, probe_async_pools=False).answer_db, health.answer_live)
        )
        self._deadline = settings.health_deadline_seconds + LOOP_GRACE_SECONDS
        self._creator_loop = _running_loop()
        host = settings.metrics_host
        try:
            self._server = make_server(
                host,
                port,
                self._wsgi,
                server_class=_ReusePortServer if reuse_port else _Server,
                handler_class=_QuietHandler,
            )
        except OSError as error:
            raise OSError(
                error.errno,
                f"poolwatch: setting metrics_port (POOLWATCH_METRICS_PORT): cannot serve on "
                f"{host}:{port}: {error.strerror}",
            ) from None
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.25},
            name=f"poolwatch-sidecar-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- WSGI ---------------------------------------------------------------------------------

    def _wsgi(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        try:
            if path == self._metrics_path:
                return self._metrics(environ, start_response)
            if path in self._health:
                return self._run_health(path, environ, start_response)
        except Exception as error:
            internal_errors.record("sidecar", error)
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [b"poolwatch: internal error\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"Not Found\n"]

    def _metrics(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        rendered = answer_metrics(
            self.watch.registry,
            method,
            environ_header(environ, "accept"),
            environ_header(environ, "accept-encoding"),
            self.watch.direct_collector,
        )
        return wsgi_answer(rendered, method, start_response)

    def _owning_loop(self) -> asyncio.AbstractEventLoop | None:
        """The running loop that async engines' connections belong to, if one is known."""
        for loop in (self.watch.app_loop, self._creator_loop):
            if loop is not None and loop.is_running():
                return loop
        return None

    def _run_health(
        self, path: str, environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        authorization = environ_header(environ, "authorization")
        loop = self._owning_loop()
        rendered = None
        if loop is not None:
            rendered = self._run_on(loop, self._health[path](method, authorization))
        if rendered is None:
            rendered = asyncio.run(self._health_without_loop[path](method, authorization))
        return wsgi_answer(rendered, method, start_response)

    def _run_on(
        self, loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, Rendered]
    ) -> Rendered | None:
        """Run ``coroutine`` on ``loop`` for its answer: ``down`` if it did not finish within the
        bounded wait, None if the loop closed before it could start."""
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        except RuntimeError:  # "Event loop is closed": it stopped since _owning_loop() looked
            coroutine.close()
            return None
        try:
            # A loop that is stuck, or stopped before running it, never finishes the future.
            return future.result(self._deadline)
        except FutureTimeout:
            future.cancel()
            return json_rendered(503, {"status": "down"})


def _served(paths: tuple[str | None, ...], answers: tuple[Answer, ...]) -> dict[str, Answer]:
    """Path -> answer, leaving out paths set to None (not served)."""
    return {path: answer for path, answer in zip(paths, answers, strict=True) if path is not None}


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
