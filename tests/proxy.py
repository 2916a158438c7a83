"""A fault-injection TCP proxy between engines and PostgreSQL, on 127.0.0.1 only.

It runs its own asyncio loop in a daemon thread, so sync and async tests share it. Modes:

- ``pass``: bytes flow both ways (bytes held back by a stall are delivered first).
- ``refuse``: new connections are closed at once; established ones keep working.
- ``stall``: new connections are accepted and never answered; established ones stop delivering
  (bytes are held, as a black-holed network would, not dropped).
- ``cut``: every established connection is dropped now; afterwards new connections pass.

Latency, beside any mode: ``set_latency(seconds)`` delays every chunk by that much in each
direction (a round trip costs twice that), as a long link would: chunks keep their order and
later ones are not held behind earlier ones' delay.

Bounded: it stops by itself after ``lifetime`` seconds, and ``stop()`` closes every socket.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Literal, TypeVar

T = TypeVar("T")

Mode = Literal["pass", "refuse", "stall", "cut"]


class _Link:
    """One client connection and, unless stalled from the start, its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        # Bytes read while stalled, per direction, delivered when the mode is pass again.
        self.held_up: list[bytes] = []
        self.held_down: list[bytes] = []

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()


class FaultProxy:
    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = "127.0.0.1",
        lifetime: float = 120,
        listen: tuple[str, int] = ("127.0.0.1", 0),
    ):
        self.upstream = (upstream_host, upstream_port)
        # Where it listens: a free port by default. Another loopback address on the server's own
        # port (127.x.y.z:5432) makes it a link rather than a proxy to whoever compares ports.
        self.listen = listen
        self.lifetime = lifetime
        self.mode: Mode = "pass"
        # Added one-way delay in seconds (set_latency).
        self.latency = 0.0
        self.accepted = 0
        self.port = 0
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)

    # -- control, from any thread ---------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def set_mode(self, mode: Mode) -> None:
        self._call(self._set_mode, mode)

    def set_latency(self, seconds: float) -> None:
        """Delay every chunk by ``seconds`` in each direction from now on (0: none)."""
        if seconds < 0:
            raise ValueError("latency must be >= 0 seconds")
        self._call(setattr, self, "latency", float(seconds))

    @property
    def open_clients(self) -> int:
        """Client connections open now (of every kind: passing, stalled, held)."""
        return self._call(lambda: len(self._links))

    def stop(self) -> None:
        if self._stopped.is_set() or not self._thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._shutdown)
        self._thread.join(10)

    def url(self, base: str) -> str:
        """``base`` (postgresql://user[:password]@127.0.0.1:5432/db) pointed at this proxy."""
        host, port = self.upstream
        target = f"{host}:{port}"
        if target not in base:
            raise ValueError("the base URL does not point at the proxied server")
        return base.replace(target, f"127.0.0.1:{self.port}", 1)

    def _call(self, function: Callable[..., T], *args: object) -> T:
        """Run ``function`` on the proxy's loop (its state belongs to that thread) and return."""

        async def run() -> T:
            return function(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    # -- the loop ---------------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()
            self._stopped.set()

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._accept, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]
        self._done = asyncio.Event()
        self._ready.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._done.wait(), self.lifetime)
        self._server.close()
        for link in list(self._links):
            link.abort()
        self._links.clear()
        # Let the pumps see their sockets close and finish.
        await asyncio.sleep(0.05)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _shutdown(self) -> None:
        self._done.set()

    def _set_mode(self, mode: Mode) -> None:
        if mode == "cut":
            for link in list(self._links):
                link.abort()
            self._links.clear()
            mode = "pass"
        self.mode = mode
        if mode == "pass":
            for link in self._links:
                self._flush(link)

    def _flush(self, link: _Link) -> None:
        if link.upstream is not None and link.held_up:
            link.upstream.write(b"".join(link.held_up))
            link.held_up.clear()
        if link.held_down:
            link.client.write(b"".join(link.held_down))
            link.held_down.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == "refuse":
            writer.transport.abort()
            return
        link = _Link(writer)
        self._links.add(link)
        try:
            if self.mode == "stall":
                # Accepted, never answered: read only to notice when the client gives up.
                while await reader.read(65536):
                    pass
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                return
            link.upstream = up_writer
            if link not in self._links:  # cut while connecting
                up_writer.transport.abort()
                return
            await asyncio.gather(
                self._pump(link, reader, up_writer, link.held_up),
                self._pump(link, up_reader, writer, link.held_down),
            )
        except (ConnectionError, OSError):
            pass
        finally:
            self._links.discard(link)
            link.abort()

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        held: list[bytes],
    ) -> None:
        # Chunks on their way under latency: (due time, bytes), oldest first.
        delayed: collections.deque[tuple[float, bytes]] = collections.deque()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if self.mode == "stall":
                    held.append(data)
                    continue
                if self.latency > 0 or delayed:
                    self._delay(writer, delayed, data)
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # One side closed: the whole link goes, as with a real TCP peer going away.
            self._links.discard(link)
            link.abort()

    def _delay(
        self, writer: asyncio.StreamWriter, delayed: collections.deque[tuple[float, bytes]], data: bytes
    ) -> None:
        loop = self._loop
        delayed.append((loop.time() + self.latency, data))
        if len(delayed) == 1:
            loop.call_at(delayed[0][0], self._deliver, writer, delayed)

    def _deliver(self, writer: asyncio.StreamWriter, delayed: collections.deque[tuple[float, bytes]]) -> None:
        now = self._loop.time()
        while delayed and delayed[0][0] <= now:
            data = delayed.popleft()[1]
            if not writer.is_closing():
                writer.write(data)
        if delayed:
            self._loop.call_at(delayed[0][0], self._deliver, writer, delayed)


@contextlib.contextmanager
def fault_proxy(upstream_port: int, lifetime: float = 120) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream_port, lifetime=lifetime).start()
    try:
        yield proxy
    finally:
        proxy.stop()
