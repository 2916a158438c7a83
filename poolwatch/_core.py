"""PoolWatch: the object that ties engines, recorders, the collector and the sweeper together."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any

import prometheus_client
from prometheus_client.registry import CollectorRegistry
from sqlalchemy.engine import Engine

from ._collector import PoolWatchCollector
from ._dialect_hooks import hook_dialect, unhook_dialect
from ._engines import collect_engines
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
        engines: Iterable[Any],
        *,
        registry: CollectorRegistry | None = None,
        name: str | None = None,
        **settings: Any,
    ) -> None:
        self.settings = build_settings(settings)
        self.registry = registry if registry is not None else prometheus_client.REGISTRY
        with _instrument_lock:
            pairs = collect_engines(engines, name, _known_name)
            shared = _registry_collectors.get(self.registry)
            if shared is None:
                shared = _registry_collectors[self.registry] = _RegistryCollector(self.registry)
            self._shared = shared
            self._engines: list[Engine] = []
            for pool_name, engine in pairs:
                instrumented = _instrumented.get(engine)
                if instrumented is None:
                    instrumented = _instrumented[engine] = _Instrumented(
                        pool_name, engine, self.settings
                    )
                recorder = instrumented.recorder
                existing = shared.recorders.get(recorder.name)
                if existing is not None and existing is not recorder:
                    raise ValueError(
                        f"poolwatch: pool name {recorder.name!r} is already used by another "
                        "engine in this registry; pass name= or {name: engine}"
                    )
                shared.recorders[recorder.name] = recorder
                instrumented.owners += 1
                self._engines.append(engine)
        self._closed = False

    @property
    def recorders(self) -> list[PoolRecorder]:
        return [_instrumented[engine].recorder for engine in self._engines]

    @property
    def requests(self) -> RequestStats:
        return self._shared.requests

    @property
    def pool_names(self) -> list[str]:
        return [recorder.name for recorder in self.recorders]

    def close(self) -> None:
        """Stop watching: hooks and listeners come off once no PoolWatch uses an engine."""
        if self._closed:
            return
        self._closed = True
        with _instrument_lock:
            for engine in self._engines:
                instrumented = _instrumented.get(engine)
                if instrumented is None:
                    continue
                instrumented.owners -= 1
                if instrumented.owners <= 0:
                    instrumented.release(engine)
                    del _instrumented[engine]
                    self._shared.recorders.pop(instrumented.recorder.name, None)
            if not self._shared.recorders:
                try:
                    self.registry.unregister(self._shared.collector)
                except KeyError:
                    pass
                _registry_collectors.pop(self.registry, None)

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
