"""Reading AnyIO's default thread limiter when AnyIO keeps it differently: an AnyIO before 4.10
(run variables keyed by name), and one that keeps them where poolwatch does not look (the metrics
are then absent and nothing fails). The limiter read is AnyIO's real one, made by a real
``to_thread`` call on this loop; only where AnyIO keeps it is changed, as the other version would.
tests/test_threadpool.py reads the installed AnyIO through a real app.
"""

from __future__ import annotations

import asyncio
import sys
import weakref
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from poolwatch._serve.threadpool import UNKNOWN, ThreadpoolState, default_limiter, read_threadpool

BACKEND = sys.modules["anyio._backends._asyncio"]


async def _limiter_in_use() -> Any:
    """This loop's real default limiter, made by AnyIO for a real worker-thread call."""
    await anyio.to_thread.run_sync(lambda: None)
    return anyio.to_thread.current_default_thread_limiter()


async def test_an_anyio_that_keys_run_variables_by_name_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    limiter = await _limiter_in_use()
    by_name: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()
    by_name[loop] = {"_default_thread_limiter": limiter}  # AnyIO < 4.10: the RunVar's name
    monkeypatch.setattr(anyio.lowlevel, "_run_vars", by_name)
    assert default_limiter(loop) is limiter
    assert read_threadpool(loop) == ThreadpoolState(busy=0, waiting=0, capacity=40)


@pytest.mark.parametrize("missing", ["run variable", "run variables", "both"])
async def test_an_anyio_that_keeps_them_elsewhere_reads_as_unknown_and_nothing_fails(
    monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    loop = asyncio.get_running_loop()
    await _limiter_in_use()
    if missing in ("run variable", "both"):
        monkeypatch.delattr(BACKEND, "_default_thread_limiter")
    if missing in ("run variables", "both"):
        monkeypatch.delattr(anyio.lowlevel, "_run_vars")
    assert default_limiter(loop) is UNKNOWN
    assert read_threadpool(loop) is None  # absent, not a made-up zero


async def test_run_variables_in_another_form_read_as_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    await _limiter_in_use()
    odd: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
    odd[loop] = [("_default_thread_limiter", None)]
    monkeypatch.setattr(anyio.lowlevel, "_run_vars", odd)
    assert default_limiter(loop) is UNKNOWN
    assert read_threadpool(loop) is None


async def test_a_loop_without_run_variables_has_no_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(anyio.lowlevel, "_run_vars", weakref.WeakKeyDictionary())
    assert default_limiter(loop) is None
    assert read_threadpool(loop) == ThreadpoolState(busy=0, waiting=0, capacity=None)


class _LimiterWithoutQueue:
    """A limiter of an AnyIO that keeps no ``_wait_queue``: only its public face, forwarded to a
    real limiter."""

    def __init__(self, limiter: Any) -> None:
        self._limiter = limiter

    @property
    def borrowed_tokens(self) -> int:
        return int(self._limiter.borrowed_tokens)

    @property
    def total_tokens(self) -> float:
        return float(self._limiter.total_tokens)

    def statistics(self) -> Any:
        return self._limiter.statistics()


async def test_a_limiter_without_a_wait_queue_is_read_through_its_statistics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    limiter = await _limiter_in_use()
    limiter.total_tokens = 1
    held = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with limiter:
            held.set()
            await release.wait()

    async def queue() -> None:
        async with limiter:
            pass

    holder = asyncio.create_task(hold())
    await held.wait()
    waiter = asyncio.create_task(queue())
    await asyncio.sleep(0.05)  # the waiter is now queued for the one token
    public: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()
    public[loop] = {BACKEND._default_thread_limiter: _LimiterWithoutQueue(limiter)}
    monkeypatch.setattr(anyio.lowlevel, "_run_vars", public)
    try:
        assert read_threadpool(loop) == ThreadpoolState(busy=1, waiting=1, capacity=1)
    finally:
        release.set()
        await asyncio.gather(holder, waiter)
        limiter.total_tokens = 40
