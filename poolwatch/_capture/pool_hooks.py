"""The acquisition wrapper: poolwatch's own hooks on a pool instance.

SQLAlchemy has no event for waiting, so pending callers, wait time and timeouts need a wrapper
around ``Pool.connect``. Wrapping ``connect`` and ``_do_return_conn`` also replaces the
``checkout``/``checkin`` event listeners, whose dispatch alone costs more than all of our
bookkeeping. ``_close_connection`` is the single place where every pool class closes DBAPI
connections, detached ones included. (Opening them is counted by the ``connect`` pool event in
``_listeners``: SQLAlchemy rebuilds ``_invoke_creator`` whenever ``pool._creator`` is set, which
would silently drop a wrapper there.)

Hooks are instance attributes of the pool, so they vanish with it, and nothing is stored on the
engine, which ``copy.copy`` and ``execution_options()`` share or copy. ``engine.dispose()`` replaces
the pool with ``pool.recreate()``; the wrapper on ``recreate`` hooks the new pool for the same
recorder once it is the watched engine's pool (a copy's ``dispose()`` gives it to the copy).
"""

from __future__ import annotations

import threading
import weakref
from _thread import get_ident
from bisect import bisect_left
from collections.abc import Callable
from contextvars import copy_context
from sys import _getframe as getframe
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import SingletonThreadPool, StaticPool
from sqlalchemy.util.queue import Empty

from .._log import internal_errors
from .._record.context import NO_REQUEST_KEY, current_request, route_label
from .._record.holds import close_stretch, returned_after_response
from .._record.recorder import CheckoutEntry, Exemplar, perf_counter
from .._record.timeout_note import add_timeout_note
from .borrow_site import borrow_site, borrow_stack, is_library_file
from .closings import closing_reason
from .tracing import exemplar

if TYPE_CHECKING:
    from sqlalchemy.pool import Pool

    from .._record.recorder import PoolRecorder

K = TypeVar("K")
_MARK = "_poolwatch_recorder"
_WRAPPED = ("connect", "_do_return_conn", "_close_connection", "recreate")
# The wrappers a pool carries until its first checkout settles which engine kept it.
_ADOPTING = "_poolwatch_adopting"
_ADOPTING_NAMES = ("connect", "recreate")
# Pools that hand one connection record to several checkouts at once (StaticPool to everyone,
# SingletonThreadPool to every connect on a thread): their checkouts are told apart by the
# connection proxy (the "fairy"), not by the record.
_SHARED_RECORD_POOLS = (StaticPool, SingletonThreadPool)


def hook_pool(pool: Pool, recorder: PoolRecorder) -> None:
    """Install the hooks on ``pool``; a pool already hooked by this recorder is left alone."""
    if getattr(pool, _MARK, None) is recorder:
        return
    if getattr(pool, _MARK, None) is not None:
        unhook_pool(pool)
    # A pool another recorder waits to adopt (a copy's pool, made by a watched engine's
    # ``recreate()``) drops that wait: its originals are the class's own methods, never the
    # adoption wrapper, which would call the hooks back and they it.
    for name in _ADOPTING_NAMES:
        if getattr(pool.__dict__.get(name), _ADOPTING, False):
            del pool.__dict__[name]

    original_connect = pool.connect
    original_return = pool._do_return_conn
    original_close = pool._close_connection
    original_recreate = pool.recreate

    # The two functions below run on every checkout and checkin. They keep the bookkeeping inline
    # (one Python frame each, locals instead of attribute lookups, histogram observations written
    # out) because on this path a call costs as much as the work; the recorder owns the state and
    # everything that is not per-event. No lock: see the recorder's docstring.
    open_checkouts = recorder.open_checkouts
    leaked_records = recorder.leaked_records
    histograms_by_key = recorder.histograms_by_key
    histograms_for = recorder.histograms_for
    # Work outside any request (workers, scripts, start-up) skips the keyed lookup.
    no_request_histograms = histograms_by_key[NO_REQUEST_KEY]
    wait = recorder.wait
    wait_counts = wait.counts
    bounds = wait.bounds
    first = wait.first
    # A checkin held longer than this may be a leak or held idle too long: a closer look.
    thresholds = [t for t in _notable_thresholds(recorder) if t > 0]
    notable = min(thresholds, default=float("inf"))
    capture_site = recorder.capture_site
    capture_stack = recorder.capture_stack
    tracing = recorder.tracing
    timeout_note = recorder.timeout_note
    get_request = current_request.get
    shares_records = isinstance(pool, _SHARED_RECORD_POOLS)
    # Threads that waited in the queue for a free slot during their current Pool.connect (see
    # ``_hook_queue``): empty, and so one truth test, while no caller queues.
    queued_threads: dict[int, bool] = {}
    _hook_queue(pool, recorder, queued_threads)

    def connect() -> Any:
        recorder.waits_started += 1
        started = perf_counter()
        try:
            fairy = original_connect()
        except sa_exc.TimeoutError as error:
            if queued_threads:
                queued_threads.pop(get_ident(), None)
            _failed_wait(recorder, started, timed_out=True)
            if timeout_note:
                add_timeout_note(recorder, error)
            raise
        except BaseException as error:
            if queued_threads:
                queued_threads.pop(get_ident(), None)
            _failed_wait(recorder, started, timed_out=False)
            if not isinstance(error, Exception):
                _maybe_cancelled(recorder, error)
            raise
        # Observed first and outside the try: from here on this caller is not waiting.
        now = perf_counter()
        waited = now - started
        wait_counts[0 if waited <= first else bisect_left(bounds, waited)] += 1
        wait.total += waited
        if queued_threads and queued_threads.pop(get_ident(), False):
            recorder.checkouts_queued += 1
        try:
            record = fairy._connection_record
            # Checkouts this DBAPI connection has served (the live page's ``uses``): kept on the
            # record, set to 0 by the connect listener when the record opens a new connection.
            try:
                record._poolwatch_uses += 1
            except AttributeError:  # opened before poolwatch watched the pool
                record._poolwatch_uses = 1
            request = get_request()
            site = None
            if capture_site:
                # The caller's frame is tested inline: when it is application code (a direct
                # pool.connect()) that saves the call into the borrow-site walk.
                try:
                    caller = getframe(1)
                except ValueError:  # connect() is the root of a greenlet or thread: no caller
                    caller = None
                if caller is not None and is_library_file.get(caller.f_code.co_filename) is False:
                    site = (caller.f_code, caller.f_lasti)
                elif caller is not None:
                    site = borrow_site(2)
            # A plain tuple (see CheckoutEntry); the list is the usage the statement timer adds to.
            entry = (
                now,
                request,
                record.fairy_ref,
                site,
                borrow_stack(2) if capture_stack else None,
                record,
                copy_context(),
                [0, 0.0, 0.0, 0.0, 0.0],
            )
            if shares_records:
                _checkout_shared(recorder, fairy, entry)
            elif open_checkouts.setdefault(record, entry) is entry:  # type: ignore[arg-type]
                recorder.checkouts += 1
                # No call between these statements: the count and its peak stay exact (see
                # ``PoolRecorder.take_peaks``).
                recorder.in_use += 1
                if recorder.in_use > recorder.peak_in_use:
                    recorder.peak_in_use = recorder.in_use
            if request is not None and request.response_started:
                recorder.count_after_response(request.route)
        except Exception as error:
            internal_errors.record("checkout", error)
        return fairy

    def do_return_conn(record: Any) -> None:
        try:
            # The pop decides: a checkin counts once, whatever else runs (another thread, or a
            # checkin the garbage collector nests here).
            entry = None if shares_records else open_checkouts.pop(record, None)
            if entry is not None:  # else taken before poolwatch was installed
                recorder.in_use -= 1
                now = perf_counter()
                held = now - entry[0]
                request = entry[1]
                if request is None:
                    key = NO_REQUEST_KEY
                    use, idle_histogram, transaction_histogram = no_request_histograms
                else:
                    key = request.key or request.labels()
                    use, idle_histogram, transaction_histogram = histograms_by_key.get(key) or histograms_for(
                        key
                    )
                    if request.response_started and request.response_started_at > entry[0]:
                        returned_after_response(recorder, entry, request, key[0], now)
                use.counts[0 if held <= first else bisect_left(bounds, held)] += 1
                use.total += held
                usage = entry[7]
                idle = held - usage[1]
                idle_histogram.counts[0 if idle <= first else bisect_left(bounds, idle)] += 1
                idle_histogram.total += idle
                # Idle inside a transaction, a stretch still open counted up to now (the pool's
                # reset normally closed it already).
                in_transaction = usage[2]
                if usage[3]:
                    close_stretch(usage, now)
                    in_transaction = usage[2]
                transaction_histogram.counts[
                    0 if in_transaction <= first else bisect_left(bounds, in_transaction)
                ] += 1
                transaction_histogram.total += in_transaction
                if tracing:
                    _keep_exemplar(recorder.use_exemplars, key, held)
                fairy_ref = entry[2]
                if (
                    held > notable
                    or (leaked_records and record in leaked_records)
                    or (fairy_ref is not None and fairy_ref() is None)
                ):
                    recorder.returned_notably(CheckoutEntry(*entry), key, held, idle, in_transaction)
        except Exception as error:
            internal_errors.record("checkin", error)
        original_return(record)

    def close_connection(connection: Any, *, terminate: bool = False) -> None:
        try:
            original_close(connection, terminate=terminate)
        finally:
            try:
                recorder.disconnected(closing_reason(getframe(1)))
            except Exception as error:
                internal_errors.record("disconnect", error)

    def recreate() -> Pool:
        return _recreate_and_adopt(original_recreate, recorder)

    pool.connect = connect  # type: ignore[method-assign]
    pool._do_return_conn = do_return_conn  # type: ignore[method-assign]
    pool._close_connection = close_connection  # type: ignore[method-assign]
    pool.recreate = recreate  # type: ignore[method-assign]
    setattr(pool, _MARK, recorder)


def _hook_queue(pool: Pool, recorder: PoolRecorder, queued_threads: dict[int, bool]) -> None:
    """Count the callers blocked in the pool's queue for a free slot (``pending``), and the
    checkouts that had to (``checkouts_queued``).

    ``QueuePool`` waits for a free slot only inside its queue's ``not_empty.wait()``, which runs
    only when the queue is empty: hooking that wait counts exactly the queued callers and costs the
    checkouts that find a connection nothing. A non-blocking ask, opening a connection and
    pre-pinging one are not queueing. The asyncio queue (``AsyncAdaptedQueue``) has no such seam
    of its own, so its blocking ``get`` is wrapped instead, and a free connection is taken without
    counting.

    A caller may wait on the condition more than once in one ``get`` (woken, and another thread
    took the connection first): its thread is marked in ``queued_threads`` and the checkout counted
    once, by ``connect`` when it succeeds. The asyncio queue's ``get`` blocks once per call, so a
    blocking get that returns is a queued checkout.
    """
    queue = pool.__dict__.get("_pool")
    if queue is None or not hasattr(queue, "__dict__"):
        return
    condition = getattr(queue, "not_empty", None)
    mutex = getattr(queue, "mutex", None)
    if type(condition) is threading.Condition and mutex is not None:
        # A condition of our own class over the same lock, put in place while nobody waits on the
        # old one (waiters register under that lock), so no caller misses a notify. An attribute
        # set on the queue's own condition instead would change its instance dict's layout, which
        # costs every checkout some 5,000 instructions in slower attribute lookups inside the
        # queue's locking (measured with benchmarks/instructions.py), waiting or not.
        # Both of the queue's conditions become ours: Condition's methods are shared bytecode,
        # specialised for one class at a time, and two classes taking turns in one checkout (ours
        # for not_empty, the stock one for not_full) cost more than the count (measured).
        full = getattr(queue, "not_full", None)
        with mutex:
            if not condition._waiters and type(full) is threading.Condition and not full._waiters:  # type: ignore[attr-defined]
                queue.not_empty = _CountingCondition(mutex, recorder, queued_threads)
                queue.not_full = _CountingCondition(mutex, None, queued_threads)
                _hooked_queues[queue] = "not_empty"
                return
    if (
        condition is not None
        and hasattr(condition, "__dict__")
        and callable(getattr(condition, "wait", None))
    ):
        # Callers already wait on it (poolwatch installed under load): count on it as it is.
        original_wait = condition.wait

        def queued_wait(timeout: float | None = None) -> Any:
            queued_threads[get_ident()] = True
            # No call between the count and its peak: both stay exact (``take_peaks``).
            recorder.queued += 1
            if recorder.queued > recorder.peak_queued:
                recorder.peak_queued = recorder.queued
            try:
                return original_wait(timeout)
            finally:
                recorder.queued -= 1

        condition.wait = queued_wait
        _hooked_queues[queue] = "wait"
        return
    get = getattr(queue, "get", None)
    if not callable(get):
        return
    original_get = get

    def queued_get(block: bool = True, timeout: float | None = None) -> Any:
        if not block:
            return original_get(block, timeout)
        # A free connection is taken at once, as the blocking get would: that caller never queued.
        try:
            return original_get(False)
        except Empty:
            pass
        recorder.queued += 1
        if recorder.queued > recorder.peak_queued:
            recorder.peak_queued = recorder.queued
        try:
            got = original_get(block, timeout)
        finally:
            recorder.queued -= 1
        recorder.checkouts_queued += 1
        return got

    queue.get = queued_get
    _hooked_queues[queue] = "get"


class _CountingCondition(threading.Condition):
    """A pool queue's ``not_empty`` condition that counts the callers waiting on it.

    Only ``wait`` differs, and it runs only when no connection is free; ``notify`` and the lock are
    the condition's own. Unhooked, it stops counting and stays (a caller may be waiting on it).
    """

    def __init__(self, lock: Any, recorder: PoolRecorder | None, queued_threads: dict[int, bool]) -> None:
        super().__init__(lock)
        self.poolwatch: tuple[PoolRecorder, dict[int, bool]] | None = (
            None if recorder is None else (recorder, queued_threads)
        )

    def wait(self, timeout: float | None = None) -> bool:
        hooked = self.poolwatch
        if hooked is None:
            return threading.Condition.wait(self, timeout)
        recorder, queued_threads = hooked
        queued_threads[get_ident()] = True
        # No call between the count and its peak: both stay exact (``take_peaks``).
        recorder.queued += 1
        if recorder.queued > recorder.peak_queued:
            recorder.peak_queued = recorder.queued
        try:
            return threading.Condition.wait(self, timeout)
        finally:
            recorder.queued -= 1


# Queues hooked, and how: kept beside them rather than on them (see ``_hook_queue``).
_hooked_queues: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def _unhook_queue(pool: Pool) -> None:
    queue = pool.__dict__.get("_pool")
    if queue is None:
        return
    how = _hooked_queues.pop(queue, None)
    if how == "not_empty" and isinstance(queue.not_empty, _CountingCondition):
        queue.not_empty.poolwatch = None
    elif how == "wait":
        queue.not_empty.__dict__.pop("wait", None)
    elif how == "get":
        queue.__dict__.pop("get", None)


def _checkout_shared(recorder: PoolRecorder, fairy: Any, entry: tuple[Any, ...]) -> None:
    """A checkout of a pool that shares one record among checkouts, keyed by its proxy.

    The record cannot tell these checkouts apart: SQLAlchemy checks a shared record in once, when
    the first of its proxies closes, and warns "Double checkin" for the others. Each proxy is
    tracked instead: its own ``_checkin`` (an instance attribute, which ``close()`` calls) takes
    its entry out, and a weak reference takes it out if the garbage collector finalizes a proxy
    that was never closed. Neither holds the proxy strongly, so SQLAlchemy's own finalization of a
    lost proxy happens exactly when it would without poolwatch.
    """
    open_checkouts = recorder.open_checkouts
    key = id(fairy)
    current = open_checkouts.get(key)
    if current is not None and current[2] is not None and current[2]() is fairy:
        return  # the same proxy handed out again while out (SingletonThreadPool): one checkout
    holder: list[Any] = []

    def reclaimed(_ref: Any) -> None:
        if holder:
            _checkin_shared(recorder, key, holder[0])

    ref = weakref.ref(fairy, reclaimed)
    # Its table key stands where a record would: the sweeper and the checkin find it there.
    shared_entry = (*entry[:2], ref, *entry[3:5], key, *entry[6:])
    holder.append(shared_entry)
    open_checkouts[key] = shared_entry  # type: ignore[assignment]
    recorder.checkouts += 1
    recorder.in_use += 1
    if recorder.in_use > recorder.peak_in_use:
        recorder.peak_in_use = recorder.in_use
    checkin = type(fairy)._checkin

    def checkin_this(*args: Any, **kwargs: Any) -> None:
        try:
            _checkin_shared(recorder, key, shared_entry)
        finally:
            proxy = ref()
            if proxy is not None:
                proxy.__dict__.pop("_checkin", None)
                checkin(proxy, *args, **kwargs)

    fairy.__dict__["_checkin"] = checkin_this


def _checkin_shared(recorder: PoolRecorder, key: int, entry: tuple[Any, ...]) -> None:
    """The checkin bookkeeping of one shared-record checkout, once whatever calls it."""
    try:
        open_checkouts = recorder.open_checkouts
        if open_checkouts.get(key) is not entry:
            return
        if open_checkouts.pop(key, None) is not entry:
            return
        recorder.in_use -= 1
        now = perf_counter()
        held = now - entry[0]
        request = entry[1]
        key_labels = NO_REQUEST_KEY if request is None else (request.key or request.labels())
        use, idle_histogram, transaction_histogram = recorder.histograms_for(key_labels)
        use.observe(held)
        usage = entry[7]
        idle = held - usage[1]
        idle_histogram.observe(idle)
        close_stretch(usage, now)
        transaction_histogram.observe(usage[2])
        if request is not None and request.response_started and request.response_started_at > entry[0]:
            returned_after_response(recorder, entry, request, key_labels[0], now)
        fairy_ref = entry[2]
        thresholds = [t for t in _notable_thresholds(recorder) if t > 0]
        gone = fairy_ref is not None and fairy_ref() is None
        if held > min(thresholds, default=float("inf")) or key in recorder.leaked_records or gone:
            recorder.returned_notably(CheckoutEntry(*entry), key_labels, held, idle, usage[2])
    except Exception as error:
        internal_errors.record("checkin", error)


def _adopt_on_first_use(pool: Pool, recorder: PoolRecorder) -> None:
    """Hook ``pool`` at its first checkout if it is then the watched engine's pool.

    ``recreate()`` cannot tell which engine asked: ``engine.dispose()`` keeps the new pool, but
    ``copy.copy(engine).dispose()`` gives it to the copy, a separate engine that nobody watches.
    By the first checkout the engine that called ``dispose()`` has its new pool, so the question
    is settled once there, off the hot path of every later checkout.
    """
    lock = threading.Lock()

    def connect() -> Any:
        with lock:
            if pool.__dict__.get("connect") is connect:
                # The class's own methods show through again, then the hooks go on if ours.
                pool.__dict__.pop("connect", None)
                pool.__dict__.pop("recreate", None)
                try:
                    if recorder.pool is pool:
                        hook_pool(pool, recorder)
                except Exception as error:
                    internal_errors.record("adopt", error)
        return pool.connect()

    def recreate() -> Pool:
        # Disposed again before any checkout: the question passes on to the next pool.
        return _recreate_and_adopt(lambda: type(pool).recreate(pool), recorder)

    setattr(connect, _ADOPTING, True)
    setattr(recreate, _ADOPTING, True)
    pool.connect = connect  # type: ignore[method-assign]
    pool.recreate = recreate  # type: ignore[method-assign]


def _recreate_and_adopt(recreate: Callable[[], Pool], recorder: PoolRecorder) -> Pool:
    """``recreate()``, then the new pool is hooked at its first checkout if the watched engine
    kept it (see ``_adopt_on_first_use``)."""
    new_pool = recreate()
    try:
        _adopt_on_first_use(new_pool, recorder)
    except Exception as error:
        internal_errors.record("recreate", error)
    return new_pool


def watched_by(record: Any, recorder: PoolRecorder) -> bool:
    """Whether a connection record belongs to a pool this recorder watches.

    Pool event listeners travel to every pool ``recreate()`` makes, a copy's included; a record
    of a pool the recorder does not watch is not its to count. (SQLAlchemy keeps the record's
    pool in a private attribute; if that ever moves, the record counts, as it did before.)
    """
    pool = getattr(record, "_ConnectionRecord__pool", None)
    return pool is None or pool.__dict__.get(_MARK) is recorder


def unhook_pool(pool: Pool) -> None:
    """Put the pool back as SQLAlchemy made it (its class attributes show through again)."""
    if getattr(pool, _MARK, None) is None:
        return
    for name in _WRAPPED:
        pool.__dict__.pop(name, None)
    _unhook_queue(pool)
    delattr(pool, _MARK)


def recorder_of(pool: Pool) -> PoolRecorder | None:
    """The recorder whose hooks are on ``pool``, if any."""
    recorder: PoolRecorder | None = pool.__dict__.get(_MARK)
    return recorder


def _keep_exemplar(exemplars: dict[K, Exemplar], key: K, value: float) -> None:
    found = exemplar(value)
    if found is not None:
        exemplars[key] = found


def _notable_thresholds(recorder: PoolRecorder) -> tuple[float, ...]:
    """Thresholds a checkin may cross that call for a closer look (``returned_notably``): each
    of them bounds hold time from below."""
    return (recorder.leak_threshold, recorder.held_idle_threshold, recorder.idle_in_transaction_threshold)


def _maybe_cancelled(recorder: PoolRecorder, error: BaseException) -> None:
    """A caller that left ``Pool.connect`` by cancellation (asyncio's CancelledError, trio's
    Cancelled, a killed greenlet): a client that gave up, counted apart from timeouts. An interrupt
    or an exit of the process is not a client giving up."""
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        return
    try:
        recorder.wait_cancelled(route_label(current_request.get()))
    except Exception as failure:
        internal_errors.record("wait_cancelled", failure)


def _failed_wait(recorder: PoolRecorder, started: float, *, timed_out: bool) -> None:
    try:
        recorder.wait_failed(started, timed_out)
    except Exception as error:
        internal_errors.record("wait_failed", error)
