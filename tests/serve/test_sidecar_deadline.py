"""The sidecar answers health from the application's event loop, and ``down`` when that loop is stuck.

Health runs on the loop that owns the application's connections; the sidecar waits for it at most
``health_deadline_seconds`` plus a second of grace, then answers 503 ``{"status": "down"}`` itself:
a loop that cannot answer a probe that late is not serving. In this process (a loop in a thread of
the test, the sidecar's own server thread), so that mutation testing sees the sidecar's code.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
from prometheus_client import CollectorRegistry

import poolwatch
from poolwatch._serve.sidecar import LOOP_GRACE_SECONDS
from tests.ports import free_port

DEADLINE = 0.05


def test_a_stuck_event_loop_is_answered_down_after_the_deadline_and_its_grace() -> None:
    port = free_port()
    started, go_on, stuck, release = (threading.Event() for _ in range(4))
    watches: list[poolwatch.PoolWatch] = []

    async def application() -> None:
        # watch() called from async code: the sidecar runs health on this loop.
        watches.append(
            poolwatch.watch(
                registry=CollectorRegistry(), metrics_port=port, metrics_host="127.0.0.1",
                health_deadline_seconds=DEADLINE,
            )
        )  # fmt: skip
        started.set()
        await asyncio.to_thread(go_on.wait)  # the loop runs freely meanwhile
        stuck.set()
        release.wait(30)  # blocking call on the loop: it is stuck until released

    loop_thread = threading.Thread(target=asyncio.run, args=(application(),), daemon=True)
    loop_thread.start()
    try:
        assert started.wait(10)
        url = f"http://127.0.0.1:{port}/health/live"
        free = httpx.get(url, timeout=10)
        assert (free.status_code, free.json()["status"]) == (200, "ok")

        go_on.set()
        assert stuck.wait(10)
        began = time.monotonic()
        down = httpx.get(url, timeout=10)
        waited = time.monotonic() - began
        assert down.status_code == 503
        assert down.headers["content-type"] == "application/json"
        assert down.content == b'{"status":"down"}'
        assert DEADLINE + LOOP_GRACE_SECONDS <= waited < DEADLINE + LOOP_GRACE_SECONDS + 3
    finally:
        go_on.set()
        release.set()
        loop_thread.join(10)
        for watch in watches:
            watch.close()
