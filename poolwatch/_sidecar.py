"""Sidecar mode: metrics and health on their own port (``metrics_port``), not the application's.

A small threading WSGI server (the kind prometheus_client's ``start_http_server`` runs) in a daemon
thread, started with the PoolWatch and stopped by ``PoolWatch.close()``. Metrics are rendered in that
thread, so they keep answering while the application's event loop is stuck. The health endpoints
are the same ASGI callables the middleware serves; they run on the application's event loop once
the middleware has seen it (an AsyncEngine's connections belong to that loop), else on a private
loop in the server thread. The middleware passes these paths through to the application, which
answers them like any unknown path (404).

The bind address is ``POOLWATCH_METRICS_HOST`` (default ``0.0.0.0``: Prometheus scrapes the pod
from outside). Under a multi-worker server every worker binds the port with ``SO_REUSEPORT``; each
one answers for the whole service (see ``_multiprocess``), so it does not matter which one the
kernel picks.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import TimeoutError as FutureTimeout
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ._asgi import Message
from ._exposition import render
from ._health import HealthEndpoints
from ._log import internal_errors

if TYPE_CHECKING:
    from ._core import PoolWatch

StartResponse = Callable[..., Any]
Endpoint = Callable[..., Any]

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

    def __init__(self, watch: PoolWatch, port: int, *, reuse_port: bool = False) -> None:
        self.watch = watch
        settings = watch.settings
        health = HealthEndpoints(watch)
        self._metrics_path = settings.metrics_path
        self._health: dict[str, Endpoint] = {
            settings.health_db_path: health.db,
            settings.health_live_path: health.live,
        }
        self._deadline = settings.health_deadline_seconds + LOOP_GRACE_SECONDS
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
            endpoint = self._health.get(path)
            if endpoint is not None:
                return self._run_asgi(endpoint, environ, start_response)
        except Exception as error:
            internal_errors.record("sidecar", error)
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [b"poolwatch: internal error\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"Not Found\n"]

    def _metrics(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b""]
        rendered = render(
            self.watch.registry,
            environ.get("HTTP_ACCEPT"),
            environ.get("HTTP_ACCEPT_ENCODING"),
            self.watch.direct_collector,
        )
        headers = [("Content-Type", rendered.content_type), ("Cache-Control", "no-store")]
        headers += [(k.decode("latin-1"), v.decode("latin-1")) for k, v in rendered.headers]
        start_response("200 OK", headers)
        return [b"" if method == "HEAD" else rendered.body]

    def _run_asgi(
        self, endpoint: Endpoint, environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": environ.get("REQUEST_METHOD", "GET"),
            "scheme": "http",
            "path": environ.get("PATH_INFO", ""),
            "raw_path": environ.get("PATH_INFO", "").encode("latin-1"),
            "query_string": environ.get("QUERY_STRING", "").encode("latin-1"),
            "root_path": "",
            "headers": [
                (key[5:].replace("_", "-").lower().encode("latin-1"), str(value).encode("latin-1"))
                for key, value in environ.items()
                if key.startswith("HTTP_")
            ],
        }
        messages: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            messages.append(message)

        loop = self.watch.app_loop
        if loop is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(endpoint(scope, receive, send), loop)
            try:
                future.result(self._deadline)
            except FutureTimeout:
                future.cancel()
                start_response("503 Service Unavailable", [("Content-Type", "application/json")])
                return [b'{"status":"down"}']
        else:
            asyncio.run(endpoint(scope, receive, send))

        start = next(m for m in messages if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
        status = int(start["status"])
        start_response(
            f"{status} {_REASONS.get(status, '')}".rstrip(),
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in start.get("headers", [])],
        )
        return [body]


_REASONS = {200: "OK", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}  # fmt: skip
