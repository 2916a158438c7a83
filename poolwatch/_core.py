"""PoolWatch: the object that ties engines, recorders, the collector and the sweeper together."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
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
from ._multiprocess import MultiProcessCollector, Publisher
from ._pool_hooks import hook_pool, unhook_pool
from ._recorder import PoolRecorder
from ._requests import RequestStats
from ._settings import PoolWatchSettings, build_settings
from ._sidecar import SidecarServer


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
        self.traced = settings.tracing
        if self.traced:
            _enable_spans(engine)

    def release(self, engine: Engine) -> None:
        sweeper.discard(self.recorder)
        if self.traced:
            from ._otel import disable_statement_spans

            disable_statement_spans(engine)
        self.listeners.remove(engine)
        unhook_dialect(engine.dialect)
        unhook_pool(engine.pool)


_instrumented: weakref.WeakKeyDictionary[Engine, _Instrumented] = weakref.WeakKeyDictionary()
_instrument_lock = threading.Lock()


def _known_name(engine: Engine) -> str | None:
    instrumented = _instrumented.get(engine)
    return None if instrumented is None else instrumented.recorder.name


def _enable_spans(engine: Engine) -> None:
    try:
        from ._otel import enable_statement_spans
    except ImportError as error:  # pragma: no cover - depends on the installed extras
        raise ImportError(
            "poolwatch: setting tracing (POOLWATCH_TRACING) needs OpenTelemetry: "
            "pip install 'poolwatch[otel]'"
        ) from error
    enable_statement_spans(engine)


_registry_numbers = itertools.count(1)


class _RegistryCollector:
    """The one poolwatch collector in a CollectorRegistry, shared by every PoolWatch using it.

    Under a multi-worker server (see ``_multiprocess``) the registered collector merges every
    worker's output; the local one is what this worker publishes.
    """

    def __init__(self, registry: CollectorRegistry, settings: PoolWatchSettings) -> None:
        self.recorders: dict[str, PoolRecorder] = {}
        self.requests = RequestStats()
        self.users = 0
        local = PoolWatchCollector(lambda: list(self.recorders.values()), self.requests)
        self.publisher: Publisher | None = None
        self.collector: PoolWatchCollector | MultiProcessCollector = local
        directory = settings.multiproc_dir
        if directory is not None:
            # Workers make their registries in the same order, so the key matches across them.
            key = (
                "default"
                if registry is prometheus_client.REGISTRY
                else f"r{next(_registry_numbers)}"
            )
            self.publisher = Publisher(local, directory, key, settings.multiproc_interval_seconds)
            self.collector = MultiProcessCollector(self.publisher)
        registry.register(self.collector)

    def close(self, registry: CollectorRegistry) -> None:
        with contextlib.suppress(KeyError):
            registry.unregister(self.collector)
        if self.publisher is not None:
            self.publisher.close()


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
        # The ASGI app's event loop, noted by the middleware: the sidecar runs health there.
        self.app_loop: asyncio.AbstractEventLoop | None = None
        self._sidecar: SidecarServer | None = None
        with _instrument_lock:
            shared = _registry_collectors.get(self.registry)
            if shared is None:
                shared = _registry_collectors[self.registry] = _RegistryCollector(
                    self.registry, self.settings
                )
            shared.users += 1
            self._shared = shared
        engines = list(engines)
        try:
            if engines:
                self.add(*engines, name=name)
            if self.settings.metrics_port is not None:
                self._sidecar = SidecarServer(
                    self, self.settings.metrics_port, reuse_port=self._shared.publisher is not None
                )
        except BaseException:
            self.close()
            raise

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
    def direct_collector(self) -> PoolWatchCollector | None:
        """The collector whose families poolwatch may write itself: not under multi-worker mode,
        where the registered collector merges other workers' files instead."""
        collector = self._shared.collector
        return collector if isinstance(collector, PoolWatchCollector) else None

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
        if self._sidecar is not None:
            self._sidecar.close()
            self._sidecar = None
        with _instrument_lock:
            for engine in self._engines:
                self._release(engine)
            self._engines.clear()
            self._shared.users -= 1
            if self._shared.users <= 0:
                self._shared.close(self.registry)
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
