"""pytest plugin for SQLAlchemy's own suite: poolwatch watches every engine the suite creates.

Loaded with ``-p sqla_suite.poolwatch_everywhere``, before SQLAlchemy's own plugin makes
``testing.db``. Every engine gets ``poolwatch.watch(engine, registry=<its own CollectorRegistry>,
name=<unique>)``, made where the suite makes engines:

- ``create_engine`` under every name it is bound to (``sqlalchemy``, ``sqlalchemy.engine``,
  ``sqlalchemy.engine.create``, and the private alias ``create_async_engine`` calls), so the
  suite's own ``testing.db`` (provision.setup_config -> testing_engine -> create_engine) is watched;
- ``create_async_engine`` and ``sqlalchemy.testing.engines.testing_engine``, which only label the
  engine their inner ``create_engine`` call watched;
- ``Engine.__init__`` for engines built directly (``Engine(pool, dialect, url)``), outside
  ``create_engine``.

Engines whose pool or dialect is not SQLAlchemy's (``Engine(Mock(), Mock(), Mock())``) are listed
as not watchable; an engine poolwatch refuses is listed as a failure. ``OptionEngine`` (from
``engine.execution_options()``) and ``copy.copy(engine)`` are views on an engine's pool, not new
engines: the pool's hooks see their checkouts.

The yardstick is SQLAlchemy's own ``checkout`` pool event, listened to on each engine's pool (the
listener travels to the pool ``engine.dispose()`` makes). It counts a checkout for engine E when
the pool is, or was, E's pool: ``engine.dispose()`` on a copy gives the copy a pool whose events
still carry E's listener, but whose checkouts are the copy's. The count is of distinct
connection fairies, so a checkout retried after a ``DisconnectionError`` counts once, as it does
for poolwatch.

Each registry is scraped when its engine is disposed and at the end of the session: gauges must
never be negative, ``poolwatch_internal_errors_total`` must stay 0, and at the end
``poolwatch_checkouts_total`` must equal the event count. The plugin never holds an engine
strongly (nor the PoolWatch, which would): the suite's engines and their connections die when
the suite drops them, as without the plugin.

``SQLA_SUITE_WATCH_REPORT`` names the JSON file the findings go to. ``SQLA_SUITE_POOLWATCH=off``
keeps everything but the ``poolwatch.watch()`` call: a control run showing that the harness alone
changes no outcome.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import gc
import importlib
import inspect
import itertools
import json
import os
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy
import sqlalchemy.engine
import sqlalchemy.engine.create
from prometheus_client.registry import CollectorRegistry
from sqlalchemy import event
from sqlalchemy.engine import base as engine_base
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.pool import Pool

import poolwatch

# The names of the originals, kept before anything is patched.
_original_create_engine = sqlalchemy.engine.create.create_engine
_original_engine_init = engine_base.Engine.__init__
_original_engine_dispose = engine_base.Engine.dispose

# The label of what is making an engine now ("testing_engine", "create_async_engine"), innermost
# last; set while our wrappers run so nested calls (testing_engine -> create_engine) are one engine.
_making: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("sqla_suite_making", default=())
_current_test = "<session start>"
_numbers = itertools.count(1)


@dataclass
class EngineRecord:
    """One engine the suite made: how it is watched and what both sides counted."""

    name: str
    origin: str
    made_in: str
    url: str
    watched: bool = False
    not_watchable: str | None = None  # not SQLAlchemy's pool/dialect: nothing for poolwatch to do
    watch_error: str | None = None  # poolwatch.watch() raised: a failure
    listen_error: str | None = None
    sqlalchemy_checkouts: int = 0  # distinct fairies the checkout event saw on the engine's pools
    sqlalchemy_checkout_events: int = 0  # every checkout event, retries included
    foreign_checkouts: int = 0  # events from pools that were never this engine's (copies' pools)
    poolwatch_checkouts: float | None = None
    scrapes: int = 0
    negative_gauges: list[str] = field(default_factory=list)
    mismatch_first_seen: str | None = None
    used_at_end: float | None = None
    engine_collected: bool = False

    # Not reported: live state.
    registry: CollectorRegistry | None = field(default=None, repr=False)
    engine_ref: Any = field(default=None, repr=False)
    pools: Any = field(default=None, repr=False)
    fairies: Any = field(default=None, repr=False)
    lock: Any = field(default_factory=threading.Lock, repr=False)

    def report(self) -> dict[str, Any]:
        return {item.name: getattr(self, item.name) for item in fields(self) if item.repr}


_records: weakref.WeakKeyDictionary[Any, EngineRecord] = weakref.WeakKeyDictionary()
_all_records: list[EngineRecord] = []
_harness_errors: list[str] = []
_internal_errors: list[dict[str, Any]] = []
_internal_errors_total = 0.0
_notes: list[str] = []
_poolwatch_on = os.environ.get("SQLA_SUITE_POOLWATCH", "on") != "off"
if not _poolwatch_on:
    _notes.append("control run: SQLA_SUITE_POOLWATCH=off, engines are counted but not watched")


def _harness_error(where: str, error: BaseException) -> None:
    """Our own mistakes are findings too: they fail the run rather than hide a result."""
    _harness_errors.append(
        f"{where} (in {_current_test}): {type(error).__name__}: {error}\n"
        + "".join(traceback.format_exception(error)[-6:])
    )


def _safe_url(engine: Any) -> str:
    try:
        return str(engine.url.render_as_string(hide_password=True))
    except Exception:
        return "<no url>"


# --- counting SQLAlchemy's own checkouts -------------------------------------------------------


def _listen_for_checkouts(record: EngineRecord, engine: Any) -> None:
    record.pools = weakref.WeakSet([engine.pool])
    record.fairies = weakref.WeakSet()
    engine_ref = record.engine_ref

    def on_checkout(dbapi_connection: Any, connection_record: Any, fairy: Any) -> None:
        try:
            pool = fairy._pool
            with record.lock:
                record.sqlalchemy_checkout_events += 1
                owner = engine_ref()
                if pool not in record.pools:
                    if owner is not None and owner.pool is pool:
                        record.pools.add(pool)
                    else:
                        record.foreign_checkouts += 1
                        return
                if fairy not in record.fairies:
                    record.fairies.add(fairy)
                    record.sqlalchemy_checkouts += 1
        except Exception as error:
            _harness_error("checkout listener", error)

    event.listen(engine.pool, "checkout", on_checkout)


# --- watching ----------------------------------------------------------------------------------


def _watch(engine: Any, origin: str) -> None:
    try:
        if engine in _records:
            return
        number = next(_numbers)
        record = EngineRecord(
            name=f"sqla-{number}", origin=origin, made_in=_current_test, url=_safe_url(engine)
        )
        record.engine_ref = weakref.ref(engine, functools.partial(_collected, record))
        _records[engine] = record
        _all_records.append(record)
        pool, dialect = engine.__dict__.get("pool"), engine.__dict__.get("dialect")
        if not isinstance(pool, Pool) or not isinstance(dialect, Dialect):
            record.not_watchable = (
                f"pool is {type(pool).__module__}.{type(pool).__qualname__}, "
                f"dialect is {type(dialect).__module__}.{type(dialect).__qualname__}"
            )
            return
        try:
            _listen_for_checkouts(record, engine)
        except Exception as error:
            record.listen_error = f"{type(error).__name__}: {error}"
        if not _poolwatch_on:
            return
        registry = CollectorRegistry()
        try:
            # Deliberately not kept: PoolWatch holds its engines strongly, and keeping it would
            # keep every engine of the suite, and its connections, alive to the end.
            poolwatch.watch(engine, registry=registry, name=record.name)
        except Exception as error:
            record.watch_error = "".join(traceback.format_exception_only(error)).strip()
            frames = traceback.extract_tb(error.__traceback__)
            if frames:
                where = frames[-1]
                short = "/".join(Path(where.filename).parts[-2:])
                record.watch_error += f" (at {short}:{where.lineno}: {where.line})"
            return
        record.registry = registry
        record.watched = True
    except Exception as error:
        _harness_error("watch", error)


def _collected(record: EngineRecord, _ref: Any) -> None:
    record.engine_collected = True


@contextlib.contextmanager
def _making_engine(label: str) -> Iterator[None]:
    token = _making.set((*_making.get(), label))
    try:
        yield
    finally:
        _making.reset(token)


def _origin(label: str) -> str:
    return ">".join((*_making.get(), label))


@functools.wraps(_original_create_engine)
def create_engine(*args: Any, **kwargs: Any) -> Any:
    origin = _origin("create_engine")
    with _making_engine("create_engine"):
        engine = _original_create_engine(*args, **kwargs)
    _watch(engine, origin)
    return engine


def _label_only(label: str, original: Callable[..., Any]) -> Callable[..., Any]:
    """A wrapper that only says who made the engine; the create_engine inside watches it."""

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _making_engine(label):
            made = original(*args, **kwargs)
        sync_engine = getattr(made, "sync_engine", made)
        if isinstance(sync_engine, engine_base.Engine) and sync_engine not in _records:
            _watch(sync_engine, _origin(label))  # made without our create_engine: watch it here
        return made

    wrapper.__sqla_suite_original__ = original  # type: ignore[attr-defined]
    return wrapper


def _after_engine_init(engine: Any) -> None:
    if "create_engine" not in _making.get():
        _watch(engine, _origin("Engine()"))


def _with_same_signature(original: Callable[..., Any], after: Callable[[Any], None]) -> Callable[..., Any]:
    """``original`` followed by ``after(self)``, with ``original``'s very parameter names.

    ``create_engine`` checks its keyword arguments against the names ``Engine.__init__``'s code
    object declares (``util.get_cls_kwargs``); a ``*args, **kwargs`` wrapper would make it refuse
    ``execution_options`` and friends, changing what SQLAlchemy does.
    """
    signature = inspect.signature(original)
    declared, passed = [], []
    star_seen = False
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            declared.append(f"*{parameter.name}")
            passed.append(f"*{parameter.name}")
            star_seen = True
        elif parameter.kind is inspect.Parameter.VAR_KEYWORD:
            declared.append(f"**{parameter.name}")
            passed.append(f"**{parameter.name}")
        elif parameter.kind is inspect.Parameter.KEYWORD_ONLY:
            if not star_seen:
                declared.append("*")
                star_seen = True
            declared.append(parameter.name)
            passed.append(f"{parameter.name}={parameter.name}")
        elif parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise TypeError(f"sqla_suite: cannot mirror positional-only {parameter.name} of {original}")
        else:
            declared.append(parameter.name)
            passed.append(parameter.name)
    first = next(iter(signature.parameters))
    source = (
        f"def {original.__name__}({', '.join(declared)}):\n"
        f"    _original({', '.join(passed)})\n"
        f"    _after({first})\n"
    )
    namespace: dict[str, Any] = {"_original": original, "_after": after}
    exec(compile(source, f"<sqla_suite mirror of {original.__qualname__}>", "exec"), namespace)  # noqa: S102
    wrapper: Any = namespace[original.__name__]
    wrapper.__defaults__ = original.__defaults__
    wrapper.__kwdefaults__ = original.__kwdefaults__
    wrapper.__qualname__ = original.__qualname__
    wrapper.__module__ = original.__module__
    wrapper.__doc__ = original.__doc__
    wrapper.__annotations__ = original.__annotations__
    wrapper.__sqla_suite_original__ = original
    return cast(Callable[..., Any], wrapper)


def _engine_dispose(self: Any, close: bool = True) -> None:
    _original_engine_dispose(self, close)
    record = _records.get(self)
    if record is not None:
        if record.pools is not None:
            with record.lock:
                record.pools.add(self.pool)
        _scrape(record, f"dispose in {_current_test}")


def _replace_everywhere(original: object, replacement: object, prefixes: tuple[str, ...]) -> list[str]:
    """Rebind every module-level name that holds ``original``, in modules under ``prefixes``."""
    replaced = []
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(prefixes):
            continue
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attribute, value in list(namespace.items()):
            if value is original:
                namespace[attribute] = replacement
                replaced.append(f"{module_name}.{attribute}")
    return replaced


def _patch_sqlalchemy() -> None:
    import sqlalchemy.ext.asyncio
    import sqlalchemy.ext.asyncio.engine

    _replace_everywhere(_original_create_engine, create_engine, ("sqlalchemy",))
    original_async = sqlalchemy.ext.asyncio.engine.create_async_engine
    _replace_everywhere(original_async, _label_only("create_async_engine", original_async), ("sqlalchemy",))
    engine_base.Engine.__init__ = _with_same_signature(  # type: ignore[method-assign]
        _original_engine_init, _after_engine_init
    )
    engine_base.Engine.dispose = _engine_dispose  # type: ignore[method-assign]


def _patch_testing_engine() -> None:
    from sqlalchemy.testing import engines

    original = engines.testing_engine
    if getattr(original, "__sqla_suite_original__", None) is None:
        _replace_everywhere(original, _label_only("testing_engine", original), ("sqlalchemy", "test"))


_patch_sqlalchemy()


# --- internal errors ---------------------------------------------------------------------------


def _hook_internal_errors() -> None:
    """Note each of poolwatch's swallowed failures with the test that caused it."""
    counter = None
    # The package root loads its modules on first use: make sure the one with the counter is in.
    with contextlib.suppress(ImportError):
        importlib.import_module("poolwatch._log")
    for name, module in list(sys.modules.items()):
        if name == "poolwatch" or name.startswith("poolwatch."):
            candidate = getattr(module, "internal_errors", None)
            if candidate is not None and callable(getattr(candidate, "record", None)):
                counter = candidate
                break
    if counter is None:
        _notes.append("poolwatch's internal error counter not found: sites are not itemised")
        return
    original_record = counter.record

    def record(site: str, error: BaseException) -> None:
        with contextlib.suppress(Exception):
            _internal_errors.append(
                {
                    "site": site,
                    "test": _current_test,
                    "error": f"{type(error).__name__}: {error}"[:500],
                    "traceback": traceback.format_exception(error)[-8:],
                }
            )
        original_record(site, error)

    counter.record = record


_hook_internal_errors()


# --- scraping ----------------------------------------------------------------------------------


def _scrape(record: EngineRecord, when: str) -> None:
    global _internal_errors_total
    registry = record.registry
    if registry is None:
        return
    try:
        checkouts = None
        used = None
        for family in registry.collect():
            for sample in family.samples:
                if family.type == "gauge" and sample.value < 0:
                    record.negative_gauges.append(f"{when}: {sample.name}{sample.labels} = {sample.value}")
                if sample.name == "poolwatch_checkouts_total" and sample.labels.get("pool") == record.name:
                    checkouts = sample.value
                elif sample.name == "poolwatch_internal_errors_total":
                    _internal_errors_total = max(_internal_errors_total, sample.value)
                elif (
                    sample.name == "poolwatch_connections"
                    and sample.labels.get("state") == "used"
                    and sample.labels.get("pool") == record.name
                ):
                    used = sample.value
        record.scrapes += 1
        record.poolwatch_checkouts = checkouts
        record.used_at_end = used
        with record.lock:
            expected = record.sqlalchemy_checkouts
        if checkouts != expected and record.mismatch_first_seen is None:
            record.mismatch_first_seen = f"{when}: poolwatch {checkouts}, SQLAlchemy events {expected}"
    except Exception as error:
        _harness_error(f"scrape of {record.name}", error)


# --- pytest hooks ------------------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    # After pytest_configure (SQLAlchemy's plugin is configured), before its sessionstart makes
    # testing.db; sqlalchemy.testing may be imported from here on.
    _patch_testing_engine()


def pytest_collection_finish(session: pytest.Session) -> None:
    # Test modules are imported now; any that bound an original before we patched are rebound.
    _patch_testing_engine()
    _replace_everywhere(_original_create_engine, create_engine, ("test",))
    try:
        from sqlalchemy.testing import config

        for cfg in config.Config.all_configs():  # type: ignore[no-untyped-call]
            db = getattr(cfg, "db", None)
            sync = getattr(db, "sync_engine", db)
            if sync is None or sync not in _records:
                _harness_errors.append(f"the suite's own engine {cfg.db!r} is not watched")
            else:
                _records[sync].origin += " (testing.db)"
    except Exception as error:
        _harness_error("testing.db check", error)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    global _current_test
    _current_test = item.nodeid
    yield
    _current_test = "<between tests>"


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _current_test
    _current_test = "<session end>"
    for record in _all_records:
        _scrape(record, "session end")
    _look_for_unseen_engines()
    findings = summarise()
    target = os.environ.get("SQLA_SUITE_WATCH_REPORT")
    if target:
        Path(target).write_text(json.dumps(findings, indent=1, sort_keys=True))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        counts = findings["counts"]
        reporter.write_sep("=", "poolwatch everywhere")
        reporter.write_line(", ".join(f"{key} {value}" for key, value in counts.items()))


def _look_for_unseen_engines() -> None:
    """A last sweep for engines alive now that none of our wrappers saw being made.

    Copies (``copy.copy(engine)``) are engines nobody "made": one whose pool is, or was, the pool
    of an engine we saw is noted; anything else means an engine factory we do not wrap.
    """
    try:
        from sqlalchemy.engine.base import OptionEngineMixin

        gc.collect()
        seen_pools = {
            id(pool) for record in _all_records if record.pools is not None for pool in record.pools
        }
        for candidate in gc.get_objects():
            if not isinstance(candidate, engine_base.Engine) or isinstance(candidate, OptionEngineMixin):
                continue
            if candidate in _records:
                continue
            pool = candidate.__dict__.get("pool")
            if id(pool) in seen_pools:
                _notes.append(
                    f"alive at the end, a copy with a watched engine's pool: {_safe_url(candidate)}"
                )
            else:
                _harness_errors.append(
                    f"an engine no wrapper saw being made is alive at the end: {type(candidate)!r} "
                    f"{_safe_url(candidate)}"
                )
    except Exception as error:
        _harness_error("unseen engine sweep", error)


def summarise() -> dict[str, Any]:
    watched = [record for record in _all_records if record.watched]
    mismatched = [record for record in watched if record.poolwatch_checkouts != record.sqlalchemy_checkouts]
    negative = [record for record in _all_records if record.negative_gauges]
    failed_watch = [record for record in _all_records if record.watch_error or record.listen_error]
    not_watchable = [record for record in _all_records if record.not_watchable]
    by_origin: dict[str, int] = {}
    for record in _all_records:
        by_origin[record.origin] = by_origin.get(record.origin, 0) + 1
    return {
        "counts": {
            "engines": len(_all_records),
            "watched": len(watched),
            "not_watchable": len(not_watchable),
            "watch_errors": len(failed_watch),
            "checkout_mismatches": len(mismatched),
            "negative_gauge_engines": len(negative),
            "internal_errors_total": _internal_errors_total,
            "internal_errors_seen": len(_internal_errors),
            "harness_errors": len(_harness_errors),
            "checkouts_compared": sum(record.sqlalchemy_checkouts for record in watched),
            "scrapes": sum(record.scrapes for record in _all_records),
        },
        "engines_by_origin": by_origin,
        "mismatches": [record.report() for record in mismatched],
        "negative_gauges": [record.report() for record in negative],
        "watch_errors": [record.report() for record in failed_watch],
        "not_watchable": [record.report() for record in not_watchable],
        "internal_errors": _internal_errors,
        "harness_errors": _harness_errors,
        "notes": _notes,
        "engines": [record.report() for record in _all_records],
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
