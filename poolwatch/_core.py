"""PoolWatch: the object that ties engines, recorders, the collector and the sweeper together."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterable
from typing import Any

import prometheus_client
from prometheus_client.registry import CollectorRegistry
from sqlalchemy.engine import Engine

from ._collector import PoolWatchCollector
from ._dialect_hooks import hook_dialect, unhook_dialect
from ._engines import collect_engines, sync_engine_of
from ._leaks import sweeper
from ._listeners import EngineListeners
from ._pool_hooks import hook_pool, unhook_pool
from ._recorder import PoolRecorder
from ._requests import RequestStats
from ._settings import PoolWatchSettings, build_settings


class _Instrumented:
    """One engine's hooks, shared by every PoolWatch that watches it (so nothing counts twice)."""

    def __init__(self, name: str, engine: Engine, settings: PoolWatchSettings) -> None:
        self.recorder = PoolRecorder(name, engine, settings)
        self.listeners = EngineListeners(self.recorder)
        self.owners = 0
        hook_pool(engine.pool, self.recorder)
        hook_dialect(engine.dialect, self.recorder, settings.slow_query_seconds)
        self.listeners.install(engine)
        sweeper.add(self.recorder)

    def release(self, engine: Engine) -> None:
        sweeper.discard(self.recorder)
        self.listeners.remove(engine)
        unhook_dialect(engine.dialect)
        unhook_pool(engine.pool)


_instrumented: weakref.WeakKeyDictionary[Engine, _Instrumented] = weakref.WeakKeyDictionary()
_instrument_lock = threading.Lock()


def _known_name(engine: Engine) -> str | None:
    instrumented = _instrumented.get(engine)
    return None if instrumented is None else instrumented.recorder.name


class _RegistryCollector:
    """The one poolwatch collector in a CollectorRegistry, shared by every PoolWatch using it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.recorders: dict[str, PoolRecorder] = {}
        self.requests = RequestStats()
        self.users = 0
        self.collector = PoolWatchCollector(lambda: list(self.recorders.values()), self.requests)
        registry.register(self.collector)


_registry_collectors: weakref.WeakKeyDictionary[CollectorRegistry, _RegistryCollector] = (
    weakref.WeakKeyDictionary()
)


class PoolWatch:
    """Watches one or more engines and publishes their pools to a Prometheus registry.

    Made by :func:`poolwatch.instrument`, :func:`poolwatch.watch` or :class:`PoolWatchMiddleware`.
    """

    def __init__(
        self,
        engines: Iterable[Any] = (),
        *,
        registry: CollectorRegistry | None = None,
        name: str | None = None,
        **settings: Any,
    ) -> None:
        self.settings = build_settings(settings)
        self.registry = registry if registry is not None else prometheus_client.REGISTRY
        self._engines: list[Engine] = []
        self._closed = False
        with _instrument_lock:
            shared = _registry_collectors.get(self.registry)
            if shared is None:
                shared = _registry_collectors[self.registry] = _RegistryCollector(self.registry)
            shared.users += 1
            self._shared = shared
        engines = list(engines)
        if engines:
            self.add(*engines, name=name)

    def add(self, *engines: Any, name: str | None = None) -> None:
        """Watch more engines, e.g. ones an app creates in its lifespan after the middleware."""
        with _instrument_lock:
            for pool_name, engine in collect_engines(engines, name, _known_name):
                if engine in self._engines:
                    continue
                existing = self._shared.recorders.get(pool_name)
                if existing is not None and existing.engine not in (None, engine):
                    raise ValueError(
                        f"poolwatch: pool name {pool_name!r} is already used by another "
                        "engine in this registry; pass name= or {name: engine}"
                    )
                instrumented = _instrumented.get(engine)
                if instrumented is None:
                    instrumented = _instrumented[engine] = _Instrumented(
                        pool_name, engine, self.settings
                    )
                self._shared.recorders[pool_name] = instrumented.recorder
                instrumented.owners += 1
                self._engines.append(engine)

    @property
    def recorders(self) -> list[PoolRecorder]:
        return [_instrumented[engine].recorder for engine in self._engines]

    @property
    def requests(self) -> RequestStats:
        return self._shared.requests

    @property
    def pool_names(self) -> list[str]:
        return [recorder.name for recorder in self.recorders]

    def remove(self, *engines: Any) -> None:
        """Stop watching these engines; hooks come off once no PoolWatch uses an engine."""
        with _instrument_lock:
            for candidate in engines:
                engine = sync_engine_of(candidate, "engine")
                if engine in self._engines:
                    self._engines.remove(engine)
                    self._release(engine)

    def close(self) -> None:
        """Stop watching every engine and leave the registry as it was."""
        if self._closed:
            return
        self._closed = True
        with _instrument_lock:
            for engine in self._engines:
                self._release(engine)
            self._engines.clear()
            self._shared.users -= 1
            if self._shared.users <= 0:
                with contextlib.suppress(KeyError):
                    self.registry.unregister(self._shared.collector)
                _registry_collectors.pop(self.registry, None)

    def _release(self, engine: Engine) -> None:
        instrumented = _instrumented.get(engine)
        if instrumented is None:
            return
        instrumented.owners -= 1
        if instrumented.owners <= 0:
            instrumented.release(engine)
            del _instrumented[engine]
            name = instrumented.recorder.name
            if self._shared.recorders.get(name) is instrumented.recorder:
                del self._shared.recorders[name]

    def __repr__(self) -> str:
        return f"PoolWatch(pools={self.pool_names!r})"


def watch(
    *engines: Any,
    registry: CollectorRegistry | None = None,
    name: str | None = None,
    **settings: Any,
) -> PoolWatch:
    """Watch engines without an ASGI app (workers, scripts); serve the registry as you like."""
    return PoolWatch(engines, registry=registry, name=name, **settings)
