"""The wiring: PoolWatch ties capture, record and serve together for the engines it is given.

``PoolWatch`` installs the hooks of ``_capture`` on each engine, keeps the ``_record`` recorders
they write, registers the collector of ``_serve`` in a Prometheus registry and starts the sidecar
and the leak sweeper. ``PoolWatchMiddleware`` and ``instrument`` build one for an ASGI app. This is
the only module that imports all three rooms; none of them imports it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import weakref
from collections.abc import Iterable
from typing import Any, Unpack

import prometheus_client
from prometheus_client.registry import CollectorRegistry
from sqlalchemy.engine import Engine

from ._capture.dialect_hooks import hook_dialect, unhook_dialect
from ._capture.engines import (
    EngineLike,
    Engines,
    collect_engines,
    pool_of,
    root_engine,
)
from ._capture.listeners import EngineListeners
from ._capture.pool_hooks import hook_pool, recorder_of, unhook_pool
from ._capture.sqlalchemy_source import SqlAlchemySource
from ._log import logger
from ._record.events import remember_application_root
from ._record.intervals import sampler as interval_sampler
from ._record.leaks import sweeper
from ._record.recorder import PoolRecorder
from ._record.requests import RequestStats
from ._runtime import require_gil
from ._serve.collector import PoolWatchCollector
from ._serve.http import ASGIApp
from ._serve.middleware import Middleware
from ._serve.multiprocess import MultiProcessCollector, Publisher
from ._serve.sidecar import SidecarServer
from ._serve.starvation import StarvationCheck
from ._serve.starvation import watcher as starvation_watcher
from ._serve.workers import warn_if_multiworker
from ._settings import PoolWatchSettings, SettingsKeywords, build_settings


class _Instrumented:
    """One engine's hooks, shared by every PoolWatch that watches it (so nothing counts twice).

    Keyed by the root engine: ``engine.execution_options(...)`` makes an engine that shares its
    parent's pool and dialect, so it is the same pool, counted once, under the same name.
    """

    def __init__(self, name: str, engine: Engine, settings: PoolWatchSettings) -> None:
        self.recorder = PoolRecorder(name, SqlAlchemySource(engine), settings)
        self.listeners = EngineListeners(self.recorder)
        self.owners = 0
        self.slow_query_seconds = settings.slow_query_seconds
        hook_pool(engine.pool, self.recorder)
        hook_dialect(engine.dialect, self.recorder, settings.slow_query_seconds)
        self.listeners.install(engine)
        sweeper.add(self.recorder)
        interval_sampler.add(self.recorder)
        self.traced = settings.tracing
        if self.traced:
            _enable_spans(engine)

    def release(self, engine: Engine) -> None:
        sweeper.discard(self.recorder)
        interval_sampler.discard(self.recorder)
        if self.traced:
            from ._otel import disable_statement_spans

            disable_statement_spans(engine)
        self.listeners.remove(engine)
        unhook_dialect(engine.dialect)
        unhook_pool(engine.pool)


class _DriverInstrumented:
    """One driver pool's hooks (``_capture.asyncpg_pool``, ``_capture.psycopg_pool``), shared like
    ``_Instrumented``."""

    def __init__(self, name: str, pool: Any, settings: PoolWatchSettings) -> None:
        from ._capture.engines import driver_library

        library = self._library = driver_library(pool)
        library.check_supported()
        self.source = library.source_for(pool)
        self.recorder = PoolRecorder(name, self.source, settings)
        self.owners = 0
        library.hook_pool(pool, self.recorder)
        sweeper.add(self.recorder)
        interval_sampler.add(self.recorder)

    def release(self, pool: Any) -> None:
        sweeper.discard(self.recorder)
        interval_sampler.discard(self.recorder)
        self._library.unhook_pool(pool)
        self.source.forget()


_instrumented: weakref.WeakKeyDictionary[Engine, _Instrumented] = weakref.WeakKeyDictionary()
# Driver pools by id: asyncpg's Pool takes no weak reference. Each entry holds its pool until the
# last PoolWatch that watches it lets go.
_driver_instrumented: dict[int, _DriverInstrumented] = {}


def _instrumentation(target: Any) -> _Instrumented | _DriverInstrumented | None:
    if isinstance(target, Engine):
        return _instrumented.get(target)
    return _driver_instrumented.get(id(target))


_instrument_lock = threading.Lock()


def _instrumented_for(engine: Any) -> tuple[Any, _Instrumented | _DriverInstrumented | None]:
    """The engine whose instrumentation covers ``engine``, and that instrumentation if any.

    Derived engines (``execution_options()``) resolve to their root; a copy that shares an already
    watched pool (``copy.copy(engine)``) resolves to the engine that watches that pool. A driver's
    pool is its own.
    """
    if not isinstance(engine, Engine):
        return engine, _driver_instrumented.get(id(engine))
    root = root_engine(engine)
    instrumented = _instrumented.get(root)
    if instrumented is None:
        recorder = recorder_of(engine.pool)
        owner = recorder.engine if recorder is not None else None
        if owner is not None and _instrumented.get(owner) is not None:
            return owner, _instrumented[owner]
    return root, instrumented


def _known_name(engine: Any) -> str | None:
    instrumented = _instrumented_for(engine)[1]
    return None if instrumented is None else instrumented.recorder.name


def _enable_spans(engine: Engine) -> None:
    # PoolWatch() checked that the spans' packages import (require_tracing).
    from ._otel import enable_statement_spans

    enable_statement_spans(engine)


_registry_numbers = itertools.count(1)


class _RegistryCollector:
    """The one poolwatch collector in a CollectorRegistry, shared by every PoolWatch using it.

    Under a multi-worker server (see ``_multiprocess``) the registered collector merges every
    worker's output; the local one is what this worker publishes.
    """

    def __init__(self, registry: CollectorRegistry, settings: PoolWatchSettings) -> None:
        # Exported name -> recorder. Usually the recorder's own name; another one where the pool
        # is watched under a second name in this registry's PoolWatch (see PoolWatch.add).
        self.recorders: dict[str, PoolRecorder] = {}
        # How many PoolWatch objects of this registry watch each pool.
        self.holders: dict[PoolRecorder, int] = {}
        self.requests = RequestStats()
        self.users = 0
        # The app loop most recently noted by a PoolWatch of this registry: its threadpool is read.
        self.app_loop: asyncio.AbstractEventLoop | None = None
        local = PoolWatchCollector(self.exported, self.requests, lambda: self.app_loop)
        self.publisher: Publisher | None = None
        self.collector: PoolWatchCollector | MultiProcessCollector = local
        directory = settings.multiproc_dir
        if directory is not None:
            # Workers make their registries in the same order, so the key matches across them.
            key = "default" if registry is prometheus_client.REGISTRY else f"r{next(_registry_numbers)}"
            self.publisher = Publisher(local, directory, key, settings.multiproc_interval_seconds)
            self.collector = MultiProcessCollector(self.publisher)
        registry.register(self.collector)

    def exported(self) -> list[tuple[str, PoolRecorder]]:
        """(exported name, recorder) of each pool. A pool whose engine was collected keeps its
        final numbers here until its name is taken over or its PoolWatch (or app) is released."""
        return list(self.recorders.items())

    def name_of(self, recorder: PoolRecorder) -> str | None:
        """The name this registry exports ``recorder`` under, if it does."""
        return next((name for name, known in self.recorders.items() if known is recorder), None)

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
        engines: Iterable[Engines] = (),
        *,
        registry: CollectorRegistry | None = None,
        name: str | None = None,
        **settings: Unpack[SettingsKeywords],
    ) -> None:
        require_gil()
        self.settings = build_settings(settings)
        if self.settings.tracing:
            # Here, not when the first engine is traced: that may be one added in the lifespan,
            # and the application's first request would fail instead of its start.
            from ._otel import require_tracing

            require_tracing()
        warn_if_multiworker(self.settings)
        # Code sites (events, the live page) are shown relative to where the application runs from.
        remember_application_root()
        self.registry = registry if registry is not None else prometheus_client.REGISTRY
        # SQLAlchemy Engines and driver pools (asyncpg's Pool).
        self._engines: list[Any] = []
        self._closed = False
        self._app_loop: asyncio.AbstractEventLoop | None = None
        self._starvation: StarvationCheck | None = None
        self._sidecar: SidecarServer | None = None
        release_abandoned()
        with _instrument_lock:
            shared = _registry_collectors.get(self.registry)
            if shared is None:
                shared = _registry_collectors[self.registry] = _RegistryCollector(
                    self.registry, self.settings
                )
            shared.users += 1
            self._shared = shared
        self._finalizer: weakref.finalize[Any, Any] | None = None
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

    def add(self, *engines: Engines, name: str | None = None) -> None:
        """Watch more engines, e.g. ones an app creates in its lifespan after the middleware."""
        with _instrument_lock:
            for pool_name, given in collect_engines(engines, name, _known_name):
                engine, instrumented = _instrumented_for(given)
                if engine in self._engines:
                    continue
                if instrumented is not None:
                    exported_as = self._shared.name_of(instrumented.recorder)
                    if exported_as is not None and exported_as != pool_name:
                        raise ValueError(
                            f"poolwatch: this engine's pool is already watched as {exported_as!r} "
                            f"in this registry, so it cannot also be {pool_name!r} here (an "
                            "engine and its execution_options() or copies share one pool); use "
                            f"{exported_as!r}, or another registry"
                        )
                existing = self._shared.recorders.get(pool_name)
                if (
                    existing is not None
                    and existing.engine not in (None, engine)
                    and (instrumented is None or existing is not instrumented.recorder)
                ):
                    if existing.engine in self._engines:
                        raise ValueError(
                            f"poolwatch: pool name {pool_name!r} is already used by another "
                            "engine of this PoolWatch; pass name= or {name: engine}"
                        )
                    # Another PoolWatch on this registry had the name: most often an app factory
                    # that made a new app and engine and never closed the old ones. The newest
                    # registration is the one the application means; the old one is still
                    # counted (its hooks stay until its PoolWatch is closed or collected) but no
                    # longer exported under this name.
                    logger.warning(
                        "poolwatch.pool_name_reused",
                        pool=pool_name,
                        detail="an earlier engine watched under this name is no longer exported; "
                        "pass name= to export both",
                    )
                if instrumented is None and not isinstance(engine, Engine):
                    instrumented = _driver_instrumented[id(engine)] = _DriverInstrumented(
                        pool_name, engine, self.settings
                    )
                elif instrumented is None:
                    instrumented = _instrumented[engine] = _Instrumented(pool_name, engine, self.settings)
                self._shared.recorders[pool_name] = instrumented.recorder
                holders = self._shared.holders
                holders[instrumented.recorder] = holders.get(instrumented.recorder, 0) + 1
                instrumented.owners += 1
                self._engines.append(engine)

    @property
    def app_loop(self) -> asyncio.AbstractEventLoop | None:
        """The ASGI app's event loop, noted by the middleware: the sidecar runs health there, and
        its AnyIO worker threads are read for the threadpool metrics and starvation."""
        return self._app_loop

    @app_loop.setter
    def app_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._app_loop = loop
        if self._closed:
            return
        self._shared.app_loop = loop
        if loop is not None and self._starvation is None:
            self._starvation = StarvationCheck(self)
            starvation_watcher.add(self._starvation)

    @property
    def recorders(self) -> list[PoolRecorder]:
        return [found.recorder for found in map(_instrumentation, self._engines) if found is not None]

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

    def remove(self, *engines: EngineLike) -> None:
        """Stop watching these engines; hooks come off once no PoolWatch uses an engine."""
        with _instrument_lock:
            for candidate in engines:
                engine = _instrumented_for(pool_of(candidate, "engine"))[0]
                if engine in self._engines:
                    self._engines.remove(engine)
                    _release_engine(engine, self._shared)

    def close(self) -> None:
        """Stop watching every engine and leave the registry as it was."""
        if self._closed:
            return
        self._closed = True
        if self._starvation is not None:
            starvation_watcher.discard(self._starvation)
            self._starvation = None
        if self._sidecar is not None:
            self._sidecar.close()
            self._sidecar = None
        if self._finalizer is None or self._finalizer.detach() is not None:
            _release_all(self._engines, self._shared, self.registry)

    def release_with(self, owner: object) -> None:
        """Release this PoolWatch's engines and names once ``owner`` (its app) is collected.

        An app factory (a new app and engine per test) may drop an app without closing anything;
        what it registered must not outlive it. A PoolWatch from ``watch()`` has no app: it lasts
        as long as its engines do.
        """
        if self._finalizer is None and not self._closed:
            self._finalizer = weakref.finalize(owner, _abandon, self._engines, self._shared, self.registry)
            self._finalizer.atexit = False

    def __repr__(self) -> str:
        return f"PoolWatch(pools={self.pool_names!r})"


def _hook_shared_dialect(dialect: Any) -> None:
    """Put statement hooks back on a dialect that an engine still watched shares.

    A ``copy.copy`` of an engine shares its parent's dialect; once disposed it has a pool of its
    own, watched apart. The dialect carries one set of hooks, the last watched engine's; releasing
    one of the engines takes them off, so the latest engine still watched gets them back, else its
    statements would no longer be timed at all. Caller holds the lock.
    """
    sharing = [i for e, i in list(_instrumented.items()) if e.dialect is dialect]
    if sharing:
        hook_dialect(dialect, sharing[-1].recorder, sharing[-1].slow_query_seconds)


def _release_engine(engine: Any, shared: _RegistryCollector) -> None:
    """Drop one owner of ``engine``; the last one takes the hooks off. Caller holds the lock."""
    instrumented = _instrumentation(engine)
    if instrumented is None:
        return
    instrumented.owners -= 1
    if instrumented.owners <= 0:
        if isinstance(instrumented, _DriverInstrumented):
            instrumented.release(engine)
            del _driver_instrumented[id(engine)]
        else:
            instrumented.release(engine)
            del _instrumented[engine]
            _hook_shared_dialect(engine.dialect)
    recorder = instrumented.recorder
    shared.holders[recorder] = shared.holders.get(recorder, 1) - 1
    if shared.holders[recorder] <= 0:
        # No PoolWatch of this registry watches the pool any more: every name it is exported
        # under here goes (a newer owner of one of those names has replaced it, and stays).
        del shared.holders[recorder]
        for name in [name for name, known in shared.recorders.items() if known is recorder]:
            del shared.recorders[name]


def _release_all(engines: list[Engine], shared: _RegistryCollector, registry: CollectorRegistry) -> None:
    with _instrument_lock:
        for engine in engines:
            _release_engine(engine, shared)
        engines.clear()
        shared.users -= 1
        if shared.users <= 0:
            shared.close(registry)
            if _registry_collectors.get(registry) is shared:
                del _registry_collectors[registry]


# PoolWatch objects collected without close(). Their release is not done in the finalizer itself:
# that may run inside any allocation of any thread (the garbage collector), even one holding
# prometheus_client's registry lock, which releasing takes. It waits here for a safe moment.
_abandoned: list[tuple[list[Engine], _RegistryCollector, CollectorRegistry]] = []


def _abandon(engines: list[Engine], shared: _RegistryCollector, registry: CollectorRegistry) -> None:
    _abandoned.append((engines, shared, registry))


def release_abandoned() -> None:
    """Release what abandoned PoolWatch objects held; called where no lock is held."""
    while _abandoned:
        try:
            engines, shared, registry = _abandoned.pop()
        except IndexError:  # another thread took the last one
            return
        _release_all(engines, shared, registry)


def watch(
    *engines: Engines,
    registry: CollectorRegistry | None = None,
    name: str | None = None,
    **settings: Unpack[SettingsKeywords],
) -> PoolWatch:
    """Watch engines without an ASGI app (workers, scripts); serve the registry as you like."""
    return PoolWatch(engines, registry=registry, name=name, **settings)


class PoolWatchMiddleware(Middleware):
    """``app.add_middleware(PoolWatchMiddleware, engines=[engine])``; settings as keywords."""

    def __init__(
        self,
        app: ASGIApp,
        engines: Engines | None = None,
        *,
        watch: PoolWatch | None = None,
        registry: CollectorRegistry | None = None,
        name: str | None = None,
        **settings: Unpack[SettingsKeywords],
    ) -> None:
        if watch is None:
            if engines is None:
                raise TypeError("poolwatch: PoolWatchMiddleware needs engines=[...] or watch=")
            watch = PoolWatch([engines], registry=registry, name=name, **settings)
            watch.release_with(self)
        elif engines is not None or settings:
            raise TypeError("poolwatch: pass either watch= or engines= with settings, not both")
        super().__init__(app, watch)


def instrument(
    app: Any,
    *engines: Engines,
    registry: CollectorRegistry | None = None,
    name: str | None = None,
    **settings: Unpack[SettingsKeywords],
) -> PoolWatch:
    """Watch ``engines`` and add :class:`PoolWatchMiddleware` to a Starlette or FastAPI ``app``."""
    add_middleware = getattr(app, "add_middleware", None)
    if not callable(add_middleware):
        raise TypeError(
            "poolwatch: instrument() needs a Starlette or FastAPI app; for another ASGI app "
            "wrap it yourself: PoolWatchMiddleware(app, watch=poolwatch.watch(engine))"
        )
    pool_watch = PoolWatch(engines, registry=registry, name=name, **settings)
    try:
        add_middleware(PoolWatchMiddleware, watch=pool_watch)
        pool_watch.release_with(app)
    except BaseException:
        # e.g. Starlette refuses middleware once the app has started: leave nothing behind.
        pool_watch.close()
        raise
    return pool_watch
