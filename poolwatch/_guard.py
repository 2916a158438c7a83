"""Leak and query-budget guards for an application's own tests (the pytest plugin's engine room).

Nothing here runs in production, and nothing here imports pytest: the plugin
(``poolwatch.pytest_plugin``) and the public context managers (``poolwatch.assert_max_queries``,
``poolwatch.assert_queries``) both drive what is below.

- **Connections** are followed by listeners on the ``Pool`` *class* (``checkout``, ``checkin``,
  ``detach``), so every pool of the process is seen, including those of module-level engines that
  a test never names and pools that ``engine.dispose()`` creates during the test. A listener on a
  class reaches pool instances made before it was added, and it is removed when the last guard
  stops. Pool events leave the statement path alone.
- **Statements** are counted by a ``before_cursor_execute`` listener on the ``Engine`` *class*,
  added when a budget starts and removed when the last one ends. poolwatch's production path never
  does this (a ConnectionEvents listener sets ``_has_events`` and costs every statement a few
  microseconds; it times statements on the dialect instead, per watched engine). A test budget
  must also count engines nobody handed to poolwatch, for a few statements, inside one test: a
  class-level listener is the one public hook that reaches every engine, existing or created
  later, the ``sync_engine`` of every ``AsyncEngine`` included. It returns what it was given
  (``retval`` is off), so the statement and its parameters are untouched. SQLAlchemy leaves
  ``Engine._has_events`` set after the listener is removed; it is put back when no class-level
  listener is left, so the rest of the test session runs as it would have.

- **Driver pools** (asyncpg's ``Pool``, psycopg_pool's ``ConnectionPool`` and
  ``AsyncConnectionPool``) have no class-level events to follow. The guard reads the checkout
  tables of the ones poolwatch watches (``poolwatch.watch(pool)`` / ``instrument(app, pool)``): a
  checkout taken after the guard started and still in its pool's table when the guard looks is a
  leak. A driver pool that poolwatch does not watch is not seen. Neither library gives back a
  connection the application lost, so such a connection is always "still checked out" (never
  "reclaimed by the garbage collector").

Listeners never raise into SQLAlchemy: their own failures are swallowed and counted as internal
errors, as everywhere in poolwatch.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import CodeType
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool, SingletonThreadPool, StaticPool

from ._capture import watched_drivers
from ._capture.borrow_site import borrow_site
from ._capture.engines import default_pool_name, driver_pool_kind, root_engine, sync_engine_of
from ._capture.sql import fingerprint
from ._log import internal_errors
from ._record.context import RequestContext, current_request
from ._record.events import describe_site
from ._record.recorder import perf_counter

EngineLike = Engine | AsyncEngine


class ConnectionLeaked(AssertionError):
    """A guarded test left a connection checked out, or let the garbage collector return it."""


class QueryBudgetExceeded(AssertionError):
    """More statements ran than a budget allows (or, for an exact budget, a different number)."""


# --- The class-level listeners, shared by every guard and budget of the process -----------------

_lock = threading.Lock()
# Replaced whole under the lock, read without it: a listener sees one consistent tuple.
_guards: tuple[PoolGuard, ...] = ()
_logs: tuple[QueryLog, ...] = ()
# Engine.__dict__["_has_events"] before our listener went on; None while it is off.
_engine_flag_before: object = None

_POOL_EVENTS = ("checkout", "checkin", "detach")
# Pools that hand one connection record to several checkouts at once.
_SHARED_RECORD_POOLS = (StaticPool, SingletonThreadPool)


def _on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    try:
        guards = _guards
        if not guards:
            return
        # Depth 1 is this listener, inside poolwatch: the walk goes on to the application's frame.
        site = borrow_site(1)
        checkout = _Checkout(
            site=site,
            request=current_request.get(),
            fairy_ref=getattr(record, "fairy_ref", None),
            # The pool is private on both objects; the record's name is the one pool_hooks reads.
            pool=getattr(proxy, "_pool", None) or getattr(record, "_ConnectionRecord__pool", None),
            task=_current_task(),
        )
        for guard in guards:
            guard._checked_out(record, checkout, proxy)
    except Exception as error:
        internal_errors.record("guard_checkout", error)


def _current_task() -> weakref.ref[asyncio.Task[Any]] | None:
    """The asyncio task taking the connection, if any (inside SQLAlchemy's greenlet too: the loop
    and its current task are the thread's)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running event loop on this thread
        return None
    return None if task is None else weakref.ref(task)


def _on_return(dbapi_connection: Any, record: Any) -> None:
    """``checkin``, and ``detach``: SQLAlchemy detaches (never checks in) a connection of an async
    engine that the garbage collector reclaimed, since it cannot reset it outside the event loop."""
    try:
        for guard in _guards:
            guard._returned(record)
    except Exception as error:
        internal_errors.record("guard_checkin", error)


def _on_statement(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    try:
        logs = _logs
        if not logs:
            return
        # The statement is kept as it is and fingerprinted only for a failure message.
        seen = _Statement(root_engine(conn.engine), statement, current_request.get())
        for log in logs:
            log._seen(seen)
    except Exception as error:
        internal_errors.record("guard_statement", error)


def _add_guard(guard: PoolGuard) -> None:
    global _guards
    with _lock:
        if not _guards:
            for name in _POOL_EVENTS:
                event.listen(Pool, name, _on_checkout if name == "checkout" else _on_return)
        _guards = (*_guards, guard)


def _remove_guard(guard: PoolGuard) -> None:
    global _guards
    with _lock:
        if guard not in _guards:
            return
        _guards = tuple(g for g in _guards if g is not guard)
        if not _guards:
            for name in _POOL_EVENTS:
                listener = _on_checkout if name == "checkout" else _on_return
                if event.contains(Pool, name, listener):
                    event.remove(Pool, name, listener)


def _add_log(log: QueryLog) -> None:
    global _logs, _engine_flag_before
    with _lock:
        if not _logs:
            _engine_flag_before = Engine.__dict__.get("_has_events", False)
            event.listen(Engine, "before_cursor_execute", _on_statement)
        _logs = (*_logs, log)


def _remove_log(log: QueryLog) -> None:
    global _logs, _engine_flag_before
    with _lock:
        if log not in _logs:
            return
        _logs = tuple(entry for entry in _logs if entry is not log)
        if _logs:
            return
        if event.contains(Engine, "before_cursor_execute", _on_statement):
            event.remove(Engine, "before_cursor_execute", _on_statement)
        if _engine_flag_before is False and not _engine_class_listeners_left():
            Engine._has_events = False
        _engine_flag_before = None


def _engine_class_listeners_left() -> bool:
    """Whether any ConnectionEvents listener is still on the Engine class itself.

    Read from SQLAlchemy's class-level dispatch; if that ever changes shape, the answer is "yes",
    which leaves ``_has_events`` set: slower statements for the rest of the session, never fewer
    events.
    """
    try:
        dispatch = Engine.dispatch
        return any(getattr(dispatch, name)._clslevel.get(Engine) for name in dispatch._event_names)
    except Exception:
        return True


def active_listeners() -> tuple[int, int]:
    """(guards, budgets) active now; for tests of the plugin's own clean-up."""
    return len(_guards), len(_logs)


# --- What was seen ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Checkout:
    site: tuple[CodeType, int] | None
    request: RequestContext | None
    fairy_ref: Any  # weakref to the connection the application held; dead once collected
    pool: Any
    # The asyncio task that took it: one still running when the test returns holds it past the test.
    task: weakref.ref[asyncio.Task[Any]] | None = None


@dataclass(frozen=True, slots=True)
class _Statement:
    engine: Engine
    text: str
    request: RequestContext | None


@dataclass(frozen=True, slots=True)
class Leak:
    """One connection a guarded test did not return: where it was taken, for which route."""

    reclaimed: bool  # the garbage collector returned it; else something still holds it
    site: str  # ``file:line``
    function: str
    route: str | None  # ``GET /users/{user_id}``; None outside a request or without the middleware
    pool: str
    # The name of the asyncio task that still held it, running, when the test returned (the loop's
    # shutdown may have cancelled it since, which returned the connection); None otherwise.
    task: str | None = None
    # Still checked out when the guard looked (else returned since, by the task's cancellation).
    still_out: bool = True

    def __str__(self) -> str:
        route = f", route {self.route}" if self.route else ""
        task = f", by task {self.task!r}" if self.task else ""
        return f"taken at {self.site} in {self.function}{route}{task} (pool {self.pool})"


def _route_of(request: RequestContext | None) -> str | None:
    if request is None:
        return None
    method = request.scope.get("method")
    return f"{method} {request.route}" if method else request.route


def _short_path(site: str) -> str:
    """A site under the working directory is shown relative to it, as pytest shows paths."""
    try:
        cwd = os.getcwd() + os.sep
    except OSError:
        return site
    return site[len(cwd) :] if site.startswith(cwd) else site


def _engines_of(engines: Iterable[object]) -> tuple[Engine, ...]:
    return tuple(root_engine(sync_engine_of(e, "an engine to guard")) for e in engines)


# --- The connection guard ---------------------------------------------------------------------


class PoolGuard:
    """Follows every checkout made while it runs; fails if one was not returned.

    The ``poolwatch_guard`` fixture is one of these, started before the test and checked after
    the test's fixtures are torn down. By default it watches every pool in the process; after
    ``only(engine, ...)`` it watches those engines' pools alone.

    No lock: a checkin may run inside the garbage collector (a connection nobody returned), on
    any thread, at any allocation, including one made while this guard is being read. A lock held
    there would deadlock its own thread. So the listeners make single dict and list operations,
    atomic under the GIL, and readers take a ``copy()`` (made in C, no Python code runs inside it)
    before they iterate.
    """

    def __init__(self) -> None:
        # Keyed by the connection record, or for a pool that hands one record to several checkouts
        # at once (StaticPool, SingletonThreadPool) by the id of each checkout's proxy.
        self._open: dict[Any, _Checkout] = {}
        self._reclaimed: list[_Checkout] = []
        # Checkouts an asyncio task still held, running, when the test returned.
        self._held_by_tasks: list[tuple[_Checkout, str]] = []
        self._engines: tuple[Engine, ...] | None = None
        # Driver pools given to ``only()`` (None: every watched driver pool), and when the guard
        # started, on the recorders' clock: driver checkouts taken since are the test's. Never
        # started, it has seen none, as it has seen no engine's checkout (no listener ran).
        self._driver_pools: tuple[Any, ...] | None = None
        self._started_at = math.inf
        self._running = False

    # - public

    def only(self, *engines: Any) -> PoolGuard:
        """Watch only these engines (``Engine`` or ``AsyncEngine``) and driver pools (asyncpg's or
        psycopg_pool's, watched by poolwatch); returns the guard."""
        if not engines:
            raise TypeError("poolwatch_guard.only() needs at least one Engine or AsyncEngine")
        drivers = tuple(e for e in engines if driver_pool_kind(e) is not None)
        self._driver_pools = drivers
        self._engines = _engines_of(e for e in engines if driver_pool_kind(e) is None)
        for record, checkout in self._open.copy().items():
            if not self._watches(checkout.pool):
                self._open.pop(record, None)
        self._reclaimed = [c for c in self._reclaimed.copy() if self._watches(c.pool)]
        return self

    @property
    def engines(self) -> tuple[Engine, ...] | None:
        """The engines given to ``only()`` (sync engines), or None for every engine."""
        return self._engines

    def start(self) -> PoolGuard:
        if not self._running:
            self._started_at = perf_counter()
            _add_guard(self)
            self._running = True
        return self

    def stop(self) -> None:
        """Take the listeners off (the last guard to stop removes them from the Pool class)."""
        _remove_guard(self)
        self._running = False

    def test_returned(self) -> None:
        """Note the checkouts that asyncio tasks still running hold as the test function returns.

        The event loop's shutdown (pytest-asyncio's, at fixture teardown) cancels such a task,
        which returns its connection before ``leaks()`` looks; the connection outlived the test
        all the same, so it is a leak.
        """
        for checkout in list(self._open.copy().values()):
            task = None if checkout.task is None else checkout.task()
            if task is not None and not task.done():
                self._held_by_tasks.append((checkout, task.get_name()))

    def leaks(self) -> list[Leak]:
        """Connections taken while the guard ran and not returned to their pool."""
        still_open = list(self._open.copy().values())
        if still_open and self._running:
            # Garbage in a reference cycle is reclaimed now, so it reads as what it is.
            gc.collect()
            still_open = list(self._open.copy().values())
        reclaimed = self._reclaimed.copy()
        dead = [c for c in still_open if c.fairy_ref is not None and c.fairy_ref() is None]
        alive = [c for c in still_open if not any(c is d for d in dead)]
        by_tasks = [(c, name) for c, name in self._held_by_tasks if not any(c is o for o in still_open)]
        task_of = {id(c): name for c, name in self._held_by_tasks}
        return (
            self._driver_leaks()
            + [self._describe(c, reclaimed=False, task=task_of.get(id(c)), running=True) for c in alive]
            + [self._describe(c, reclaimed=False, task=name, running=False) for c, name in by_tasks]
            + [self._describe(c, reclaimed=True) for c in [*reclaimed, *dead]]
        )

    def _driver_leaks(self) -> list[Leak]:
        """Checkouts of watched driver pools taken since the guard started and still out."""
        found = []
        given = self._driver_pools
        for recorder in list(watched_drivers.recorders):
            pool = recorder.pool
            if pool is None or (given is not None and not any(pool is p for p in given)):
                continue
            for entry in list(recorder.open_checkouts.copy().values()):
                if entry[0] < self._started_at:
                    continue  # taken before the test (a fixture's, or another test's)
                site, function = describe_site(entry[3])
                found.append(
                    Leak(
                        reclaimed=False,
                        site=_short_path(site),
                        function=function,
                        route=_route_of(entry[1]),
                        pool=recorder.name,
                    )
                )
        return found

    def check(self) -> None:
        """Raise ``ConnectionLeaked`` naming every connection not returned so far."""
        __tracebackhide__ = True
        leaks = self.leaks()
        if leaks:
            raise ConnectionLeaked(leak_message(leaks))

    # - called by the listeners

    def _watches(self, pool: Any) -> bool:
        engines = self._engines
        return engines is None or any(engine.pool is pool for engine in engines)

    def _checked_out(self, record: Any, checkout: _Checkout, proxy: Any) -> None:
        if not self._watches(checkout.pool):
            return
        if isinstance(checkout.pool, _SHARED_RECORD_POOLS) and proxy is not None:
            self._checked_out_shared(checkout, proxy)
        else:
            self._open[record] = checkout

    def _checked_out_shared(self, checkout: _Checkout, proxy: Any) -> None:
        """A checkout of a pool that shares its record among checkouts, followed by its proxy.

        SQLAlchemy checks a shared record in once (when the first proxy closes), so the ``checkin``
        event cannot say which checkout ended. The proxy's own ``_checkin`` (which ``close()``
        calls) can: an instance attribute in front of it takes the entry out, and a weak reference
        notices a proxy the garbage collector finalized without a close. Neither keeps the proxy
        alive, so SQLAlchemy finalizes a lost one exactly when it would have.
        """
        key = id(proxy)
        ref = weakref.ref(proxy, lambda _: self._gone(key, checkout))
        checkout = _Checkout(checkout.site, checkout.request, ref, checkout.pool, checkout.task)
        self._open[key] = checkout
        previous = proxy.__dict__.get("_checkin")

        def checkin(*args: Any, **kwargs: Any) -> None:
            if self._open.get(key) is checkout:
                self._open.pop(key, None)
            held = ref()
            if held is None:
                return
            if previous is None:
                held.__dict__.pop("_checkin", None)
                type(held)._checkin(held, *args, **kwargs)
            else:
                held.__dict__["_checkin"] = previous
                previous(*args, **kwargs)

        proxy.__dict__["_checkin"] = checkin

    def _gone(self, key: int, checkout: _Checkout) -> None:
        """A shared-record checkout's proxy was collected; never closed if it is still open."""
        try:
            if self._open.get(key) is checkout and self._open.pop(key, None) is checkout:
                self._reclaimed.append(checkout)
        except Exception as error:
            internal_errors.record("guard_gone", error)

    def _returned(self, record: Any) -> None:
        checkout = self._open.pop(record, None)
        if checkout is None:  # taken before the guard started, not watched, or a shared record
            return
        if checkout.fairy_ref is not None and checkout.fairy_ref() is None:
            self._reclaimed.append(checkout)

    def _describe(
        self, checkout: _Checkout, *, reclaimed: bool, task: str | None = None, running: bool = False
    ) -> Leak:
        site, function = describe_site(checkout.site)
        return Leak(
            reclaimed=reclaimed,
            site=_short_path(site),
            function=function,
            route=_route_of(checkout.request),
            pool=self._pool_name(checkout.pool),
            task=task,
            still_out=running,
        )

    def _pool_name(self, pool: Any) -> str:
        """The name poolwatch would give the pool, found from its engine (only on failure)."""
        candidates: Iterable[object] = self._engines or gc.get_objects()
        for candidate in candidates:
            if isinstance(candidate, Engine) and candidate.pool is pool:
                return default_pool_name(candidate)
        return type(pool).__name__


def leak_message(leaks: list[Leak]) -> str:
    held = [leak for leak in leaks if not leak.reclaimed and leak.still_out]
    by_tasks = [leak for leak in leaks if not leak.reclaimed and not leak.still_out]
    reclaimed = [leak for leak in leaks if leak.reclaimed]
    lines = []
    if held:
        lines.append(f"{_connections(len(held))} still checked out at the end of the test:")
        lines += [f"  - {leak}" for leak in held]
    if by_tasks:
        lines.append(
            f"{_connections(len(by_tasks))} held by an asyncio task still running when the test "
            "returned (cancelled since by the event loop's shutdown, which returned it):"
        )
        lines += [f"  - {leak}" for leak in by_tasks]
    if reclaimed:
        lines.append(f"{_connections(len(reclaimed))} never returned, reclaimed by the garbage collector:")
        lines += [f"  - {leak}" for leak in reclaimed]
    return "\n".join(lines)


def _connections(count: int) -> str:
    return "1 connection" if count == 1 else f"{count} connections"


# --- Query budgets ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatementGroup:
    """Statements with one fingerprint: how many ran, and for which routes."""

    fingerprint: str
    count: int
    routes: tuple[str, ...]


class QueryLog:
    """The statements executed while it runs, on every engine or on the ones it was given."""

    def __init__(self, engines: Iterable[EngineLike] = ()) -> None:
        given = _engines_of(engines)
        self._engines: tuple[Engine, ...] | None = given or None
        self._statements: list[_Statement] = []

    def start(self) -> QueryLog:
        _add_log(self)
        return self

    def stop(self) -> None:
        _remove_log(self)

    def restrict(self, engines: tuple[Engine, ...] | None) -> None:
        """Count only these engines' statements, those already seen included (None: all)."""
        self._engines = engines

    def _seen(self, statement: _Statement) -> None:
        self._statements.append(statement)  # one atomic append: listeners run on many threads

    def _counted(self) -> list[_Statement]:
        engines = self._engines
        statements = list(self._statements)
        if engines is None:
            return statements
        return [s for s in statements if any(s.engine is engine for engine in engines)]

    @property
    def count(self) -> int:
        """Statements executed (cursor executions; an ``executemany`` is one)."""
        return len(self._counted())

    @property
    def fingerprints(self) -> list[str]:
        """Each statement, in order, with its literals and parameters replaced by ``?``."""
        return [fingerprint(s.text) for s in self._counted()]

    def groups(self) -> list[StatementGroup]:
        """Statements grouped by fingerprint, most repeated first (then in the order first run)."""
        counts: dict[str, int] = {}
        routes: dict[str, dict[str, None]] = {}
        for statement in self._counted():
            shown = fingerprint(statement.text)
            counts[shown] = counts.get(shown, 0) + 1
            route = _route_of(statement.request)
            if route is not None:
                routes.setdefault(shown, {})[route] = None
        order = sorted(counts, key=lambda shown: -counts[shown])  # stable: ties keep first-run order
        return [StatementGroup(shown, counts[shown], tuple(routes.get(shown, {}))) for shown in order]

    def check(self, limit: int, *, exact: bool = False) -> None:
        """Raise ``QueryBudgetExceeded`` if more statements ran than ``limit`` (or not exactly it)."""
        __tracebackhide__ = True
        count = self.count
        if count > limit or (exact and count != limit):
            raise QueryBudgetExceeded(budget_message(self.groups(), count, limit, exact=exact))


def budget_message(groups: list[StatementGroup], count: int, limit: int, *, exact: bool) -> str:
    expected = f"exactly {limit}" if exact else f"at most {limit}"
    lines = [f"expected {expected} {_statements(limit)}, {count} ran:"]
    width = len(str(groups[0].count)) if groups else 1
    for group in groups:
        routes = f"   [{', '.join(group.routes)}]" if group.routes else ""
        lines.append(f"  {group.count:>{width}} × {group.fingerprint}{routes}")
    return "\n".join(lines)


def _statements(count: int) -> str:
    return "statement" if count == 1 else "statements"


def _check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise TypeError(f"poolwatch: a query budget is a whole number of statements >= 0, got {limit!r}")
    return limit


def max_queries_of(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """The limit of ``@pytest.mark.max_queries(n)`` (or ``max_queries(n=...)``)."""
    if len(args) == 1 and not kwargs:
        return _check_limit(args[0])
    if not args and set(kwargs) == {"n"}:
        return _check_limit(kwargs["n"])
    raise TypeError("poolwatch: use @pytest.mark.max_queries(n) with one whole number n")


class QueryBudget:
    """The context manager of ``assert_max_queries`` and ``assert_queries``; yields its log."""

    def __init__(self, limit: int, engines: tuple[EngineLike, ...], *, exact: bool) -> None:
        self.limit = _check_limit(limit)
        self.exact = exact
        self.log = QueryLog(engines)

    def __enter__(self) -> QueryLog:
        return self.log.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        __tracebackhide__ = True
        self.log.stop()
        if kind is None:  # the block's own exception is never replaced
            self.log.check(self.limit, exact=self.exact)


def assert_max_queries(limit: int, *engines: EngineLike) -> QueryBudget:
    """Fail unless at most ``limit`` statements run inside the ``with`` block.

    Counts every engine in the process, or only ``engines`` (``Engine`` or ``AsyncEngine``) when
    given. On failure the message lists the statements as fingerprints (literals and parameters
    replaced by ``?``), grouped and counted, most repeated first: an N+1 shows as one line run N
    times. The block's own exception, if it raises, is never replaced.
    """
    return QueryBudget(limit, engines, exact=False)


def assert_queries(count: int, *engines: EngineLike) -> QueryBudget:
    """Fail unless exactly ``count`` statements run inside the ``with`` block (see
    ``assert_max_queries``)."""
    return QueryBudget(count, engines, exact=True)
