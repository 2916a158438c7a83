"""AnyIO's worker threads, as the application's event loop has them.

Sync endpoints and sync dependencies run in AnyIO worker threads, each holding one token of the
loop's default ``CapacityLimiter`` (40 tokens unless the app changes it). When every token is taken,
the next sync call waits; ``_serve.starvation`` watches for the deadlock that this makes possible.

Reading the limiter. ``anyio.to_thread.current_default_thread_limiter()`` only works on the loop
and *creates* the limiter when the app never used a thread, which would change the app. AnyIO keeps
it in a run variable: ``anyio.lowlevel._run_vars`` maps each running loop (the asyncio backend's
event-loop token, weakly) to that loop's variables, keyed by the ``RunVar`` object since AnyIO 4.10
and by its name before. A scrape reads that mapping with plain ``dict.get`` calls, which are atomic,
so it works on the loop (``/metrics`` through the middleware) and on any other thread (the sidecar,
a multi-worker publisher) without blocking the loop or creating anything. Off the loop the limiter's
``statistics()`` is avoided: it copies the set of borrowers, which the loop may change meanwhile;
``len()`` of its borrowers (``borrowed_tokens``) and of its wait queue is one atomic call each.
An AnyIO that keeps these elsewhere reads as "no threadpool": the metrics are absent, nothing fails.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from typing import Any

_BACKEND = "anyio._backends._asyncio"


@dataclass(frozen=True)
class ThreadpoolState:
    """The default thread limiter of one loop, read at one instant."""

    busy: int  # tokens borrowed: worker threads running app code now
    waiting: int  # tasks waiting for a token
    capacity: float | None  # total tokens (may be math.inf); None: the app never used a thread


NO_THREADS = ThreadpoolState(busy=0, waiting=0, capacity=None)


def default_limiter(loop: asyncio.AbstractEventLoop) -> Any | None:
    """The default thread limiter AnyIO made for ``loop``, or None; never creates one."""
    backend = sys.modules.get(_BACKEND)
    lowlevel = sys.modules.get("anyio.lowlevel")
    if backend is None or lowlevel is None:
        return None  # the asyncio backend never ran here, so no limiter exists
    run_var = getattr(backend, "_default_thread_limiter", None)
    run_vars = getattr(lowlevel, "_run_vars", None)
    if run_var is None or run_vars is None:
        return None
    values = run_vars.get(loop)
    if not isinstance(values, dict):
        return None
    limiter = values.get(run_var)
    if limiter is None:  # AnyIO before 4.10 keyed run variables by name
        limiter = values.get(getattr(run_var, "_name", None))
    return limiter


def read_threadpool(loop: asyncio.AbstractEventLoop | None) -> ThreadpoolState | None:
    """The loop's worker threads now; None when no loop is known (no ASGI app) or it is closed."""
    if loop is None or loop.is_closed():
        return None
    limiter = default_limiter(loop)
    if limiter is None:
        return NO_THREADS
    busy = int(limiter.borrowed_tokens)
    capacity = float(limiter.total_tokens)
    queue = getattr(limiter, "_wait_queue", None)
    if queue is not None:
        waiting = len(queue)
    elif _running_loop() is loop:  # on the loop nothing changes the limiter under us
        waiting = int(limiter.statistics().tasks_waiting)
    else:
        return ThreadpoolState(busy=busy, waiting=0, capacity=capacity)
    return ThreadpoolState(busy=busy, waiting=waiting, capacity=capacity)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
