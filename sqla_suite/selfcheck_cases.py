"""Cases that must trip, or must pass, each check of ``poolwatch_everywhere``.

Not a test module of the project (the name keeps it out of ``tests/`` collection): ``selfcheck``
runs it under the plugin and reads the plugin's report, so every CI run first shows that the
yardstick can fail. Each case's engines are found in the report by the node id they were made in.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import weakref
from typing import Any

import pytest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import create_engine, event, exc, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import QueuePool

import poolwatch
from sqla_suite import poolwatch_everywhere as plugin


def _record(engine: Any) -> plugin.EngineRecord:
    return plugin._records[getattr(engine, "sync_engine", engine)]


def _use(engine: Engine, times: int) -> None:
    for _ in range(times):
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))


def test_clean_engine() -> None:
    """Three checkouts, counted the same by both sides: no finding."""
    engine = create_engine("sqlite://", poolclass=QueuePool, execution_options={"selfcheck": True})
    _use(engine, 3)
    engine.dispose()
    record = _record(engine)
    assert record.watched and record.sqlalchemy_checkouts == 3


def test_retried_checkout() -> None:
    """A checkout retried after a DisconnectionError is one checkout on both sides."""
    engine = create_engine("sqlite://", poolclass=QueuePool)
    raised: list[bool] = []

    @event.listens_for(engine, "checkout")
    def disconnect_once(*args: Any) -> None:
        if not raised:
            raised.append(True)
            raise exc.DisconnectionError("selfcheck")

    _use(engine, 1)
    engine.dispose()
    record = _record(engine)
    assert raised and record.sqlalchemy_checkout_events == 2 and record.sqlalchemy_checkouts == 1


class _FakeFairy:
    """Enough of a connection fairy for a checkout event nobody really made."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool


def test_miscount() -> None:
    """A checkout event poolwatch cannot have seen: the counts must disagree by one."""
    engine = create_engine("sqlite://", poolclass=QueuePool)
    _use(engine, 1)
    fairy = _FakeFairy(engine.pool)
    engine.pool.dispatch.checkout(None, None, fairy)
    engine.dispose()
    assert _record(engine).sqlalchemy_checkouts == 2


class _NegativeGauge(Collector):
    def collect(self) -> Any:
        yield GaugeMetricFamily("selfcheck_negative", "A gauge below zero.", value=-1)


def test_negative_gauge() -> None:
    engine = create_engine("sqlite://", poolclass=QueuePool)
    registry = _record(engine).registry
    assert registry is not None
    registry.register(_NegativeGauge())
    engine.dispose()


def test_internal_error() -> None:
    """One of poolwatch's swallowed failures, recorded the way poolwatch records them."""
    counter = None
    for module in list(sys.modules.values()):
        candidate = getattr(module, "internal_errors", None)
        if getattr(module, "__name__", "").startswith("poolwatch") and candidate is not None:
            counter = candidate
            break
    assert counter is not None
    counter.record("selfcheck", RuntimeError("selfcheck"))
    engine = create_engine("sqlite://", poolclass=QueuePool)
    engine.dispose()


def test_watch_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """poolwatch.watch() raising is a finding, and the engine still works."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("selfcheck refusal")

    monkeypatch.setattr(poolwatch, "watch", refuse)
    engine = create_engine("sqlite://")
    _use(engine, 1)
    assert _record(engine).watch_error is not None


def test_direct_engine() -> None:
    """An Engine built without create_engine is watched too."""
    template = create_engine("sqlite://", poolclass=QueuePool)
    engine = Engine(template.pool, template.dialect, template.url)
    assert _record(engine).watched and _record(engine).origin == "Engine()"


def test_async_engine() -> None:
    engine = create_async_engine("sqlite+aiosqlite://")

    async def use() -> None:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        await engine.dispose()

    asyncio.run(use())
    record = _record(engine)
    assert record.watched and record.origin == "create_async_engine>create_engine"
    assert record.sqlalchemy_checkouts == 1


def test_engines_are_not_kept_alive() -> None:
    engine = create_engine("sqlite://", poolclass=QueuePool)
    _use(engine, 1)
    record = _record(engine)
    reference = weakref.ref(engine)
    del engine
    gc.collect()
    assert reference() is None and record.engine_collected


_module_engine = None


def test_unseen_engine_is_reported() -> None:
    """An Engine made behind every wrapper's back (the real __init__, not ours) and kept alive."""
    global _module_engine
    template = create_engine("sqlite://", poolclass=QueuePool)
    other = create_engine("sqlite://", poolclass=QueuePool)
    _module_engine = Engine.__new__(Engine)
    plugin._original_engine_init(_module_engine, other.pool.recreate(), template.dialect, template.url)
