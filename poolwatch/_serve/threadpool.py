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
An AnyIO that keeps these elsewhere cannot be read: the metrics are absent, nothing fails.
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


class _Unknown:
    """This AnyIO keeps its run variables where poolwatch does not know to look."""


UNKNOWN = _Unknown()


def default_limiter(loop: asyncio.AbstractEventLoop) -> Any:
    """The default thread limiter AnyIO made for ``loop``, None if it made none, or ``UNKNOWN``.

    Never creates one.
    """
    backend = sys.modules.get(_BACKEND)
    if backend is None:
        return None  # AnyIO's asyncio backend never ran in this process: no limiter exists
    lowlevel = sys.modules.get("anyio.lowlevel")
    run_var = getattr(backend, "_default_thread_limiter", None)
    run_vars = getattr(lowlevel, "_run_vars", None)
    if run_var is None or run_vars is None:
        return UNKNOWN
    values = run_vars.get(loop)
    if values is None:
        return None  # no run variable was ever set on this loop
    if not isinstance(values, dict):
        return UNKNOWN
    limiter = values.get(run_var)
    if limiter is None:  # AnyIO before 4.10 keyed run variables by name
        limiter = values.get(getattr(run_var, "_name", None))
    return limiter


def read_threadpool(loop: asyncio.AbstractEventLoop | None) -> ThreadpoolState | None:
    """The loop's worker threads now; None when no loop is known (no ASGI app), it is closed, or
    this AnyIO cannot be read (then the metrics are absent rather than a made-up zero)."""
    if loop is None or loop.is_closed():
        return None
    limiter = default_limiter(loop)
    if limiter is None:
        return NO_THREADS
    if limiter is UNKNOWN:
        return None
    busy = int(limiter.borrowed_tokens)
    capacity = float(limiter.total_tokens)
    # Every AnyIO 4 asyncio limiter has the queue. Without it: statistics(), which on the loop sees
    # no change meanwhile and off it may meet the borrowers changing under its copy and raise
    # (the collector counts that and skips these rows for the scrape).
    queue = getattr(limiter, "_wait_queue", None)
    waiting = len(queue) if queue is not None else int(limiter.statistics().tasks_waiting)
    return ThreadpoolState(busy=busy, waiting=waiting, capacity=capacity)
