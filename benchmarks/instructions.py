"""poolwatch's hot path in instructions: a measure that does not move with the machine's load.

Wall-clock ratios on a shared 2-core VM swing by 10-15 % with whatever else runs, which is wider
than the gaps left to close. An instruction count does not: each workload below runs in a process
of its own under ``valgrind --tool=callgrind``, once with N1 operations and once with N2, and its
cost per operation is

    (I(N2) - I(N1)) / (N2 - N1)

so imports, engine set-up, warm-up and teardown, identical in both runs, cancel. PYTHONHASHSEED
is fixed for each pair (dict and set layouts, hence probe counts, depend on it). On x86-64,
callgrind's client requests (a few bytes of machine code called through ctypes) switch the
instrumentation on just around the measured loop: the count is the same, but the imports run at
Valgrind's uninstrumented speed, about 5x faster; elsewhere everything is counted and cancels
the same way, slower. Only the main thread is counted, and children run with a 30 s GIL switch
interval: poolwatch's leak sweeper wakes on a timer, so what it does (and what it makes the main
thread do when it asks for the GIL) depends on how long the run takes, not on N. Repeated runs of
one seed then agree to within 0.02 %; across hash seeds, counts differ by up to a few per cent.
Absolute counts can move by about 1 % when unrelated code changes (CPython's global method cache
collides differently), so compare rows of one run. Under valgrind every duration is 20-50x
longer, so branches on a measured time (which histogram bucket) can differ from native runs.

Wall-clock beside it comes from the same loop functions, run natively in this process in paired,
interleaved, shuffled rounds (``pool_cycle.measure``), median of the rounds.

Rows:
- pool checkout + checkin (``pool.connect().close()`` on a QueuePool over psycopg, as in
  ``pool_cycle.py``): bare; poolwatch with default settings; the same inside a request (route
  attribution); leak detection off; and two floors written here: count-only wrappers around the
  same two pool methods, and wrappers doing just wait + hold timing, an RLock and the checkout table.
  Also the cycle through ``engine.connect()``, where the borrow site is found by walking past
  SQLAlchemy's frames.
- per statement, in-memory SQLite: ``dialect.do_execute`` (poolwatch's wrapper vs bare) and a
  whole ``connection.exec_driver_sql("SELECT 1")``.
- per request: a FastAPI app doing one SELECT on a sync psycopg engine, called through httpx's
  ASGITransport, bare vs ``poolwatch.instrument``; repeated with several hash seeds for the spread,
  and converted to microseconds with this machine's instructions per microsecond on the same path.
- where the instructions go: per-cycle cost of each Python operation the two pool wrappers use
  (micro-loops counted the same way) and callgrind's C-function profile, default minus bare.

    python benchmarks/instructions.py                    # everything, a few minutes on 2 cores
    python benchmarks/instructions.py --cache-sim        # + simulated cache misses, mispredictions per request
    python benchmarks/instructions.py --dbapi fake       # pool rows over a do-nothing DBAPI connection
    python benchmarks/instructions.py --sections pool breakdown --jobs 1
    python benchmarks/instructions.py --no-valgrind      # wall-clock only (also the smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import contextvars
import ctypes
import gc
import itertools
import mmap
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pool_cycle
    import sqlalchemy as sa

# SQLAlchemy, poolwatch, pool_cycle and _common are imported where used: the micro-operation
# children need none of them and start in a fraction of the time.

Timer = Callable[[int], float]  # runs n operations, returns seconds per operation
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"  # as _common's

# --------------------------------------------------------------------------------------------
# Callgrind client requests, without a compiler
# --------------------------------------------------------------------------------------------

# valgrind.h's client-request sequence for amd64, as a function ``uint64 f(uint64 *args)``:
# rax = args; rdx = 0 (the default result); the four rotations of rdi (128 bits in all, so rdi is
# unchanged) and ``xchg rbx, rbx`` are Valgrind's marker; natively they do nothing and return 0.
_CLIENT_REQUEST_AMD64 = bytes.fromhex(
    "4889f8"  # mov rax, rdi
    "31d2"  # xor edx, edx
    "48c1c703" "48c1c70d" "48c1c73d" "48c1c733"  # rol rdi, 3 / 13 / 61 / 51
    "4887db"  # xchg rbx, rbx
    "4889d0"  # mov rax, rdx
    "c3"  # ret
)  # fmt: skip
_RUNNING_ON_VALGRIND = 0x1001
_CALLGRIND_BASE = (ord("C") << 24) | (ord("T") << 16)
_DUMP_STATS_AT = _CALLGRIND_BASE + 3
_START_INSTRUMENTATION = _CALLGRIND_BASE + 4
_STOP_INSTRUMENTATION = _CALLGRIND_BASE + 5


class ClientRequests:
    """Start and stop callgrind's instrumentation from Python; no-ops where unavailable."""

    def __init__(self) -> None:
        self._call: Callable[[Any], int] | None = None
        if platform.machine() not in ("x86_64", "AMD64") or sys.platform != "linux":
            return
        try:
            self._code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        except OSError:  # a kernel that refuses writable + executable memory
            return
        self._code.write(_CLIENT_REQUEST_AMD64)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._code))
        prototype = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64))
        self._call = prototype(address)

    @property
    def available(self) -> bool:
        return self._call is not None

    def request(self, code: int, argument: int = 0) -> int:
        if self._call is None:
            return 0
        return self._call((ctypes.c_uint64 * 6)(code, argument, 0, 0, 0, 0))

    def running_on_valgrind(self) -> bool:
        return self.request(_RUNNING_ON_VALGRIND) != 0

    def start(self) -> None:
        self.request(_START_INSTRUMENTATION)

    def stop(self) -> None:
        self.request(_STOP_INSTRUMENTATION)

    def dump(self, name: str) -> None:
        """Write what was counted since the last dump to a file of its own, named ``name`` inside."""
        text = ctypes.create_string_buffer(name.encode())
        self.request(_DUMP_STATS_AT, ctypes.addressof(text))


def client_requests_usable() -> bool:
    """Whether children can switch instrumentation on themselves (then imports run uninstrumented)."""
    return ClientRequests().available


# --------------------------------------------------------------------------------------------
# The workloads ("units"): each builds its objects and returns a Timer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    name: str
    section: str  # pool, statement, request, op
    label: str
    build: Callable[[argparse.Namespace], Timer]


class FakeConnection:
    """A DBAPI connection that does nothing, like the mocks of SQLAlchemy's own pool tests."""

    def rollback(self) -> None:
        pass

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass

    def cursor(self) -> Any:
        raise NotImplementedError("the fake connection is only checked out and in")


def pool_engine(args: argparse.Namespace) -> sa.Engine:
    """``pool_cycle.make_engine``'s QueuePool, with one connection open and the dialect ready."""
    import pool_cycle
    import sqlalchemy as sa

    engine = pool_cycle.make_engine(pool_url(args))
    engine.connect().close()  # dialect initialised from a real server in both modes
    if args.dbapi == "fake":
        # Before any wrapper is installed: poolwatch hooks whatever engine.pool is then.
        engine.pool = sa.pool.QueuePool(FakeConnection, pool_size=5, max_overflow=5, dialect=engine.dialect)
    return engine


def pool_url(args: argparse.Namespace) -> str:
    from _common import with_driver

    return with_driver(args.url, "psycopg")


def watched(engine: sa.Engine, **settings: Any) -> sa.Engine:
    from prometheus_client import CollectorRegistry

    import poolwatch

    poolwatch.watch(engine, registry=CollectorRegistry(), name="bench", **settings)
    return engine


def install_count_only(pool: sa.pool.Pool) -> None:
    """Floor A: the two wrappers and an exact count each, nothing else."""
    original_connect = pool.connect
    original_return = pool._do_return_conn
    checkouts = itertools.count()
    checkins = itertools.count()

    def connect() -> Any:
        next(checkouts)
        return original_connect()

    def do_return_conn(record: Any) -> None:
        next(checkins)
        original_return(record)

    pool.connect = connect  # type: ignore[method-assign]
    pool._do_return_conn = do_return_conn  # type: ignore[method-assign]


def install_timing_lock_table(pool: sa.pool.Pool) -> None:
    """Floor B: wait and hold timing, one re-entrant lock per event, and the checkout table."""
    original_connect = pool.connect
    original_return = pool._do_return_conn
    perf_counter = time.perf_counter
    lock = threading.RLock()  # re-entrant, as poolwatch's must be (GC re-entry at checkin)
    acquire = lock.acquire
    release = lock.release
    table: dict[Any, float] = {}
    totals = [0.0, 0.0]  # seconds waited, seconds held

    def connect() -> Any:
        started = perf_counter()
        fairy = original_connect()
        now = perf_counter()
        record = fairy._connection_record
        acquire()
        try:
            totals[0] += now - started
            table[record] = now
        finally:
            release()
        return fairy

    def do_return_conn(record: Any) -> None:
        ended = perf_counter()
        acquire()
        try:
            started = table.pop(record, None)
            if started is not None:
                totals[1] += ended - started
        finally:
            release()
        original_return(record)

    pool.connect = connect  # type: ignore[method-assign]
    pool._do_return_conn = do_return_conn  # type: ignore[method-assign]


LATENCY_BOUNDS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)  # fmt: skip  (poolwatch's LATENCY_BUCKETS)


def install_sketch(pool: sa.pool.Pool) -> None:
    """Not poolwatch: the default settings' bookkeeping with the ideas of the breakdown applied.

    The same facts are kept per checkout (callers waiting, wait and hold histograms per route,
    checkouts and checkins, the entry with time, request, weakref, borrow site, record and context,
    the reclaim/leak test at checkin), but:

    - no lock: every count is ``next()`` on an ``itertools.count`` (one atomic C call), one per
      histogram bucket; the table is written with one ``dict`` store and taken with one
      ``dict.pop``, each atomic, so the pop decides which checkin counts;
    - no separate checkout/checkin/finished counters: checkouts are the wait histogram's count,
      checkins the hold histograms', and callers waiting = started - (checkouts + failures);
    - the first histogram bucket is tested before bisecting (a healthy pool's waits are there);
    - the borrow-site cache is keyed by file name (a str caches its hash; a code object is hashed
      again, consts and names included, on every lookup), the code object read once.

    The sums of seconds stay plain ``+=`` on a list slot, which CPython 3.11 does not interrupt
    between threads but the language does not promise. A sketch to size the ideas, nothing more.
    """
    original_connect = pool.connect
    original_return = pool._do_return_conn
    perf_counter = time.perf_counter
    getframe = sys._getframe
    copy_context = contextvars.copy_context
    get_request = contextvars.ContextVar("sketch_request", default=None).get
    bounds = LATENCY_BOUNDS
    first = bounds[0]
    waits_started = itertools.count()
    wait_failures = itertools.count()
    wait_buckets = [itertools.count() for _ in range(len(bounds) + 1)]
    use_buckets: dict[str, list[itertools.count[int]]] = {}
    sums = [0.0, 0.0]
    table: dict[Any, tuple[Any, ...]] = {}
    leaked_records: set[Any] = set()
    library_files: dict[str, bool] = {}
    notable: list[tuple[Any, ...]] = []
    leak_threshold = 30.0
    import sqlalchemy

    sqlalchemy_dir = os.path.dirname(sqlalchemy.__file__)

    def slow_site(frame: Any) -> tuple[Any, int] | None:
        while frame is not None:
            filename = frame.f_code.co_filename
            library = library_files.get(filename)
            if library is None:
                library = library_files[filename] = filename.startswith(sqlalchemy_dir)
            if not library:
                return frame.f_code, frame.f_lasti
            frame = frame.f_back
        return None

    def buckets_of(route: str) -> list[itertools.count[int]]:
        return use_buckets.setdefault(route, [itertools.count() for _ in range(len(bounds) + 1)])

    def connect() -> Any:
        next(waits_started)
        started = perf_counter()
        try:
            fairy = original_connect()
        except BaseException:
            next(wait_failures)
            raise
        now = perf_counter()
        waited = now - started
        record = fairy._connection_record
        caller = getframe(1)
        code = caller.f_code
        site = (code, caller.f_lasti) if library_files.get(code.co_filename) is False else slow_site(caller)
        table[record] = (now, get_request(), record.fairy_ref, site, record, copy_context())
        next(wait_buckets[0 if waited <= first else bisect_left(bounds, waited)])
        sums[0] += waited
        return fairy

    def do_return_conn(record: Any) -> None:
        entry = table.pop(record, None)
        if entry is not None:
            held = perf_counter() - entry[0]
            request = entry[1]
            route = "<none>" if request is None else (request.resolved_route or request.route)
            buckets = use_buckets.get(route) or buckets_of(route)
            next(buckets[0 if held <= first else bisect_left(bounds, held)])
            sums[1] += held
            fairy_ref = entry[2]
            if (
                (fairy_ref is not None and fairy_ref() is None)
                or held > leak_threshold
                or (leaked_records and record in leaked_records)
            ):
                notable.append(entry)
        original_return(record)

    pool.connect = connect  # type: ignore[method-assign]
    pool._do_return_conn = do_return_conn  # type: ignore[method-assign]


def engine_cycle_timer(engine: sa.Engine) -> Timer:
    """A checkout + checkin the way applications make them: ``engine.connect()`` and close."""

    def run(cycles: int) -> float:
        connect = engine.connect
        started = time.perf_counter()
        for _ in range(cycles):
            connect().close()
        return (time.perf_counter() - started) / cycles

    return run


def exec_driver_sql_timer(engine: sa.Engine) -> Timer:
    def run(cycles: int) -> float:
        with engine.connect() as connection:
            execute = connection.exec_driver_sql
            started = time.perf_counter()
            for _ in range(cycles):
                execute("SELECT 1")
            return (time.perf_counter() - started) / cycles

    return run


def sqlite_engine(instrumented: bool) -> sa.Engine:
    import sqlalchemy as sa

    engine = sa.create_engine("sqlite://")
    return watched(engine) if instrumented else engine


def cursor_execute_timer(instrumented: bool) -> Callable[[argparse.Namespace], Timer]:
    def build(args: argparse.Namespace) -> Timer:
        import pool_cycle

        return pool_cycle.cursor_execute_timer(sqlite_engine(instrumented))

    return build


def statement_timer(instrumented: bool) -> Callable[[argparse.Namespace], Timer]:
    def build(args: argparse.Namespace) -> Timer:
        return exec_driver_sql_timer(sqlite_engine(instrumented))

    return build


# -- per request ------------------------------------------------------------------------------


def request_app(args: argparse.Namespace, mode: str) -> Any:
    """One route, one SELECT on a sync psycopg engine, called in the event loop's own thread.

    An ``async def`` endpoint (blocking on the database, which is fine for a measurement) keeps the
    path single-threaded and so deterministic; a ``def`` endpoint adds a thread hand-off that is
    the same with and without poolwatch.
    """
    import sqlalchemy as sa
    from fastapi import FastAPI
    from prometheus_client import CollectorRegistry

    import poolwatch

    engine = sa.create_engine(pool_url(args), pool_size=5, max_overflow=5)
    app = FastAPI()
    statement = sa.text("SELECT CAST(:user_id AS integer) + 1")

    @app.get("/users/{user_id}")
    async def user(user_id: int) -> dict[str, int]:
        with engine.connect() as connection:
            value = connection.execute(statement, {"user_id": user_id}).scalar_one()
        return {"id": user_id, "next": value}

    if mode == "instrument":
        poolwatch.instrument(app, engine, registry=CollectorRegistry(), name="bench")
    elif mode == "instrument_no_site":  # leak detection off: no borrow-site walk per checkout
        poolwatch.instrument(
            app, engine, registry=CollectorRegistry(), name="bench", leak_threshold_seconds=0
        )
    elif mode == "watch":  # the engine's hooks without the middleware: no request context
        poolwatch.watch(engine, registry=CollectorRegistry(), name="bench")
    elif mode == "noop":  # the floor of the middleware: the hooks and one do-nothing ASGI layer
        poolwatch.watch(engine, registry=CollectorRegistry(), name="bench")
        app.add_middleware(NoopMiddleware)
    return app


class NoopMiddleware:
    """A pure ASGI middleware that only passes the call on: what any middleware layer costs."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def thread_user_seconds() -> float:
    """User CPU time of this thread: what callgrind's main-thread count corresponds to.

    System time (the sockets to PostgreSQL) is the kernel's, which callgrind does not count.
    """
    import resource

    who = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
    return resource.getrusage(who).ru_utime


class RequestDriver:
    """Sequential requests through httpx's ASGITransport on an event loop of its own."""

    def __init__(self, app: Any) -> None:
        import httpx

        self.loop = asyncio.new_event_loop()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench")
        self.cpu_per_request = 0.0  # process CPU, user + system, of the last run
        self.user_per_request = 0.0  # this thread's user CPU of the last run

    async def _many(self, count: int) -> None:
        get = self.client.get
        for _ in range(count):
            response = await get("/users/7")
            if response.status_code != 200:
                raise RuntimeError(f"/users/7 answered {response.status_code}")

    def run(self, count: int) -> float:
        cpu, user, wall = time.process_time(), thread_user_seconds(), time.perf_counter()
        self.loop.run_until_complete(self._many(count))
        self.cpu_per_request = (time.process_time() - cpu) / count
        self.user_per_request = (thread_user_seconds() - user) / count
        return (time.perf_counter() - wall) / count


def request_timer(mode: str) -> Callable[[argparse.Namespace], Timer]:
    def build(args: argparse.Namespace) -> Timer:
        return RequestDriver(request_app(args, mode)).run

    return build


# -- micro-operations: what each Python statement of the pool wrappers costs --------------------


class _Slots:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self) -> None:
        self.bounds = (
            0.0001,
            0.00025,
            0.0005,
            0.001,
            0.0025,
            0.005,
            0.01,
            0.025,
            0.05,
            0.1,
            0.25,
            0.5,
            1.0,
            2.5,
            5.0,
            10.0,
            30.0,
            60.0,
        )  # fmt: skip  (poolwatch's LATENCY_BUCKETS)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0


class _Plain:
    """An object with a ``__dict__``, like the recorder, a request context or a connection record."""

    def __init__(self) -> None:
        self.checkouts = 0
        self.capture_site = True
        self.response_started = False
        self.resolved_route: str | None = None
        self.route = "<none>"

    def method(self) -> None:
        pass


# (name, what it stands for in poolwatch's wrappers, statement(s) in the loop body). The loop runs
# inside a closure, so names are free variables, as the wrappers' are.
OPS: list[tuple[str, str, str]] = [
    ("loop", "the empty loop, subtracted from every other row", "pass"),
    ("call_through", "an extra Python frame: a closure that calls the original bound method",
     "wrapper()"),
    ("call_direct", "(the same bound method called directly)", "target()"),
    ("perf_counter", "time.perf_counter() and a float subtraction", "waited = perf_counter() - started"),
    ("ticker", "(next(itertools.count()): the lock-free count before int +=)", "next(ticker)"),
    ("contextvar_get", "ContextVar.get(): the current request", "request = get_request()"),
    ("getframe", "sys._getframe(1) in try/except", "try:\n    caller = getframe(1)\nexcept ValueError:\n    caller = None"),
    ("site", "(borrow site keyed by the code object, before: CPython 3.11 re-hashes it)",
     "try:\n    caller = getframe(1)\nexcept ValueError:\n    caller = None\n"
     "if caller is not None and is_library_code.get(caller.f_code) is False:\n"
     "    site = (caller.f_code, caller.f_lasti)"),
    ("copy_context", "contextvars.copy_context() (and freeing it)", "context = copy_context()"),
    ("entry_tuple", "the 8-field checkout entry tuple with its usage list (and freeing them)",
     "entry = (started, request, fairy_ref, site, None, record, context, [0, 0.0])"),
    ("rlock", "(RLock acquire() + release() in try/finally: floor B, and poolwatch before)",
     "acquire()\ntry:\n    pass\nfinally:\n    release()"),
    ("lock", "(Lock acquire() + release(), for comparison)", "lock_acquire()\ntry:\n    pass\nfinally:\n    lock_release()"),
    ("histogram", "counts[bisect_left(bounds, v)] += 1; total += v (wait, hold, held idle)",
     "hist.counts[bisect_left(hist.bounds, waited)] += 1\nhist.total += waited"),
    ("attr_load", "an attribute load (fairy._connection_record, recorder.capture_site...)",
     "value = recorder.capture_site"),
    ("attr_increment", "recorder.checkouts += 1, recorder.waits_started += 1", "recorder.checkouts += 1"),
    ("table", "checkout table: setdefault at checkout, pop at checkin",
     "table.setdefault(record, entry)\ntable.pop(record, None)"),
    ("entry_fields", "entry[0], entry[1], entry[2] at checkin", "a = entry[0]\nb = entry[1]\nc = entry[2]"),
    ("route_lookup", "route of the request and its use histogram at checkin",
     "route = NO_REQUEST if request is None else (request.resolved_route or request.route)\n"
     "use = use_by_route.get(route) or use_histogram(route)"),
    ("weakref", "fairy_ref is not None and fairy_ref() is None", "reclaimed = fairy_ref is not None and fairy_ref() is None"),
    ("set_member", "leaked_records and record in leaked_records (empty set: tested for truth only)",
     "flagged = leaked_records and record in leaked_records"),
    # Ideas, not in poolwatch today: what they would cost instead.
    ("idea_site_by_file", "borrow site, fast path: getframe(1), cache keyed by co_filename, (f_code, f_lasti)",
     "try:\n    caller = getframe(1)\nexcept ValueError:\n    caller = None\n"
     "if caller is not None and library_files.get(caller.f_code.co_filename) is False:\n"
     "    site = (caller.f_code, caller.f_lasti)"),
    ("idea_fast_bucket", "histogram with the first bucket tested inline before bisect_left",
     "hist.counts[0 if waited <= first_bound else bisect_left(hist.bounds, waited)] += 1\nhist.total += waited"),
    ("idea_bucket_ticker", "lock-free exact bucket count: next() on a per-bucket itertools.count",
     "next(tickers[0 if waited <= first_bound else bisect_left(bounds, waited)])"),
    ("idea_with_rlock", "`with lock:` instead of acquire()/release()", "with rlock:\n    pass"),
    ("idea_ticker_increment", "next(ticker) instead of recorder.checkouts += 1 under the lock", "next(ticker)"),
]  # fmt: skip


def op_environment() -> dict[str, Any]:
    holder = _Plain()
    record = _Plain()
    lock = threading.Lock()
    rlock = threading.RLock()

    target = holder.method  # a bound method kept in a variable, as the wrappers keep the originals

    def wrapper() -> None:
        return target()

    histogram = _Slots()
    return {
        "wrapper": wrapper,
        "target": target,
        "perf_counter": time.perf_counter,
        "started": time.perf_counter(),
        "ticker": itertools.count(),
        "get_request": contextvars.ContextVar("bench_request", default=None).get,
        "getframe": sys._getframe,
        "is_library_code": {},  # filled by the first pass through the loop (see below)
        "copy_context": contextvars.copy_context,
        "request": None,
        "fairy_ref": weakref.ref(holder),
        "site": None,
        "record": record,
        "context": contextvars.copy_context(),
        "entry": (1.0, None, weakref.ref(holder), None, None, record, None),
        "acquire": rlock.acquire,
        "release": rlock.release,
        "lock_acquire": lock.acquire,
        "lock_release": lock.release,
        "hist": histogram,
        "bisect_left": bisect_left,
        "waited": 2e-5,
        "recorder": holder,
        "table": {},
        "NO_REQUEST": "<none>",
        "use_by_route": {"<none>": histogram},
        "use_histogram": lambda route: histogram,
        "leaked_records": set(),
        "library_files": {},
        "first_bound": histogram.bounds[0],
        "bounds": histogram.bounds,
        "tickers": [itertools.count() for _ in histogram.counts],
        "rlock": rlock,
        "_holder": holder,
    }


def op_timer(statement: str) -> Callable[[argparse.Namespace], Timer]:
    def build(args: argparse.Namespace) -> Timer:
        environment = op_environment()
        names = [name for name in environment if not name.startswith("_")]
        body = "\n".join("            " + line for line in statement.splitlines())
        source = (
            f"def factory({', '.join(names)}):\n"
            "    def run(n):\n"
            "        # Whoever calls the loop is application code to the borrow-site row.\n"
            "        is_library_code[getframe(1).f_code] = False\n"
            "        library_files[getframe(1).f_code.co_filename] = False\n"
            "        started_at = perf_counter()\n"
            "        for _ in range(n):\n"
            f"{body}\n"
            "        return (perf_counter() - started_at) / n\n"
            "    return run\n"
        )
        namespace: dict[str, Any] = {}
        exec(compile(source, f"<op {statement[:20]}>", "exec"), namespace)
        run: Timer = namespace["factory"](**{name: environment[name] for name in names})
        return run

    return build


# -- the table of units -------------------------------------------------------------------------


def units() -> dict[str, Unit]:
    def pool(name: str, label: str, setup: Callable[[sa.Engine], Any], in_request: bool = False) -> Unit:
        def build(args: argparse.Namespace) -> Timer:
            import pool_cycle

            engine = pool_engine(args)
            setup(engine)
            return pool_cycle.cycle_timer(engine, in_request=in_request)

        return Unit(name, "pool", label, build)

    def nothing(engine: sa.Engine) -> None:
        pass

    found = [
        pool("bare", "bare pool", nothing),
        pool("floor_count", "floor A: count-only wrappers", lambda e: install_count_only(e.pool)),
        pool("floor_timing", "floor B: timing + RLock + checkout table",
             lambda e: install_timing_lock_table(e.pool)),
        pool("no_leaks", "poolwatch, leak detection off", lambda e: watched(e, leak_threshold_seconds=0)),
        pool("default", "poolwatch, default settings", watched),
        pool("default_request", "poolwatch, default settings, inside a request", watched, in_request=True),
        pool("sketch", "sketch, not poolwatch: default's bookkeeping, lock-free (see ideas)",
             lambda e: install_sketch(e.pool)),
        Unit("engine_bare", "pool", "bare, via engine.connect()",
             lambda args: engine_cycle_timer(pool_engine(args))),
        Unit("engine_default", "pool", "poolwatch default, via engine.connect()",
             lambda args: engine_cycle_timer(watched(pool_engine(args)))),
        Unit("do_execute_bare", "statement", "dialect.do_execute, bare", cursor_execute_timer(False)),
        Unit("do_execute_pw", "statement", "dialect.do_execute, poolwatch", cursor_execute_timer(True)),
        Unit("exec_sql_bare", "statement", "exec_driver_sql('SELECT 1'), bare", statement_timer(False)),
        Unit("exec_sql_pw", "statement", "exec_driver_sql('SELECT 1'), poolwatch", statement_timer(True)),
        Unit("request_bare", "request", "request, bare", request_timer("bare")),
        Unit("request_watch", "request", "request, poolwatch.watch(engine) only (no middleware)",
             request_timer("watch")),
        Unit("request_noop", "request",
             "request, floor: watch(engine) + a do-nothing ASGI middleware", request_timer("noop")),
        Unit("request_pw", "request", "request, poolwatch.instrument", request_timer("instrument")),
        Unit("request_pw_no_site", "request",
             "request, poolwatch.instrument, leak detection off (no borrow-site walk)",
             request_timer("instrument_no_site")),
    ]  # fmt: skip
    found += [Unit(f"op_{name}", "op", label, op_timer(statement)) for name, label, statement in OPS]
    return {unit.name: unit for unit in found}


UNITS = units()
SECTION_UNITS = {
    section: [unit.name for unit in UNITS.values() if unit.section == section]
    for section in ("pool", "statement", "request", "op")
}
SWITCH_INTERVAL = 30.0  # seconds; see child()
OPS_CHILD = "ops"  # the child that runs every micro-operation loop
WARMUP = {"pool": 300, "statement": 300, "request": 50, "op": 1000}


# --------------------------------------------------------------------------------------------
# The child: one unit, N operations, instrumentation around the loop
# --------------------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    control = ClientRequests()
    counting = args.control == "client-requests"
    if counting and not control.running_on_valgrind():
        raise SystemExit("instructions.py --child: told to use client requests, not under valgrind")
    if args.child == OPS_CHILD:
        child_ops(args, control)
    else:
        unit = UNITS[args.child]
        run = unit.build(args)
        run(WARMUP[unit.section])  # connections open, caches and specialised bytecode warm
        gc.collect()
        # The leak sweeper wakes every 0.25 s of wall time, and under valgrind that is every few
        # operations; each time it asks for the GIL, the main thread is made to drop it at the next
        # 5 ms switch interval. A long interval leaves it the GIL until it blocks on I/O itself, so
        # what the main thread executes depends on N, not on how slowly valgrind runs it.
        sys.setswitchinterval(SWITCH_INTERVAL)
        if counting:
            control.start()
        run(args.n)
        if counting:
            control.stop()
    sys.stdout.flush()
    # Without finalizers: the interpreter's teardown is the same for both N, but slow under valgrind.
    os._exit(0)


def child_ops(args: argparse.Namespace, control: ClientRequests) -> None:
    """Every micro-operation loop, N1 then N2 iterations, each counted into a dump of its own.

    One process instead of one per loop and N: these loops share nothing but the interpreter.
    """
    runs = {name: UNITS[name].build(args) for name in SECTION_UNITS["op"]}
    for run in runs.values():
        run(WARMUP["op"])
    for name, run in runs.items():
        for n in (args.n, args.n2):
            gc.collect()
            control.start()
            run(n)
            control.stop()
            control.dump(f"{name}:{n}")


# --------------------------------------------------------------------------------------------
# The parent: run the pairs under callgrind, read the counts
# --------------------------------------------------------------------------------------------


@dataclass
class Count:
    unit: str
    n: int
    seed: int
    main_thread: int
    other_threads: int
    files: list[Path] = field(default_factory=list)
    # Main thread, every event counted (with --cache-sim: cache misses and branch mispredictions).
    events: dict[str, int] = field(default_factory=dict)


def read_total(path: Path) -> int:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            value = int(line.split()[1])
            if value or line.startswith("totals:"):
                return value
    raise RuntimeError(f"no totals in {path}")


def read_events(path: Path) -> dict[str, int]:
    names: list[str] = []
    with path.open(errors="replace") as lines:
        for line in lines:
            if line.startswith("events:"):
                names = line.split()[1:]
            elif line.startswith("totals:"):
                return dict(zip(names, (int(value) for value in line.split()[1:]), strict=False))
    raise RuntimeError(f"no totals in {path}")


def run_counted(
    args: argparse.Namespace, unit: str, ns: Sequence[int], seed: int, out_dir: Path
) -> list[Count]:
    """One callgrind process: ``unit`` with ``ns[0]`` operations, or every micro-operation loop."""
    import poolwatch

    out = out_dir / f"{unit}.n{ns[0]}.s{seed}.out"
    command = [
        "valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}",
        *(["--instr-atstart=no"] if args.control == "client-requests" else []),
        *(["--cache-sim=yes", "--branch-sim=yes"] if args.cache_sim and unit.startswith("request_") else []),
        sys.executable, str(Path(__file__).resolve()), "--child", unit, "--n", str(ns[0]),
        *(["--n2", str(ns[1])] if unit == OPS_CHILD else []),
        "--url", args.url, "--dbapi", args.dbapi, "--control", args.control,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONHASHSEED=str(seed))
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(poolwatch.__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    files = sorted(out_dir.glob(f"{out.name}-*"))
    if result.returncode != 0 or not files:
        raise RuntimeError(f"{unit} n={ns[0]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    if unit != OPS_CHILD:
        main, *others = files
        events = read_events(main)
        return [Count(unit, ns[0], seed, events["Ir"], sum(read_total(f) for f in others), files, events)]
    counts = []
    for dump in sorted(out_dir.glob(f"{out.name}.*-01")):  # one per loop and N, main thread
        name, _, n = trigger_of(dump).rpartition(":")
        counts.append(Count(name, int(n), seed, read_total(dump), 0, [dump]))
    return counts


def trigger_of(path: Path) -> str:
    with path.open(errors="replace") as lines:
        for line in lines:
            if line.startswith("desc: Trigger: Client Request: "):
                return line.split(": ", 3)[-1].strip()
    raise RuntimeError(f"{path} is not a client request's dump")


@dataclass
class PerOp:
    """Instructions per operation of one unit, one value per seed."""

    unit: str
    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)


def count_all(
    args: argparse.Namespace, plan: list[tuple[str, tuple[int, int], list[int]]], out_dir: Path
) -> tuple[dict[str, PerOp], dict[tuple[str, int, int], Count]]:
    # With client requests all micro-operation loops share one process (dumps per loop and N).
    together = args.control == "client-requests"
    jobs: list[tuple[str, Sequence[int], int]] = [
        (unit, [n], seed)
        for unit, ns, seeds in plan
        if not (together and UNITS[unit].section == "op")
        for seed in seeds
        for n in ns
    ]
    op_plans = [(ns, seeds) for unit, ns, seeds in plan if together and UNITS[unit].section == "op"]
    if op_plans:
        jobs.insert(0, (OPS_CHILD, op_plans[0][0], op_plans[0][1][0]))
    counts: dict[tuple[str, int, int], Count] = {}
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as executor:
        futures = [executor.submit(run_counted, args, *job, out_dir) for job in jobs]
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            for count in future.result():
                counts[count.unit, count.n, count.seed] = count
            print(f"  callgrind {done}/{len(jobs)} ({time.monotonic() - started:.0f} s)",
                  file=sys.stderr, flush=True)  # fmt: skip
    per_op = {}
    for unit, (n1, n2), seeds in plan:
        per_op[unit] = PerOp(unit, [
            (counts[unit, n2, seed].main_thread - counts[unit, n1, seed].main_thread) / (n2 - n1)
            for seed in seeds
        ])  # fmt: skip
    return per_op, counts


# --------------------------------------------------------------------------------------------
# Wall-clock, natively, paired rounds
# --------------------------------------------------------------------------------------------


# Every callgrind run of this report, by (unit, N, seed).
COUNTS: dict[tuple[str, int, int], Count] = {}

# Instructions per microsecond measured on a path, for converting counts to time.
RATES: dict[str, float] = {}

# Timers live until the process ends: some keep a connection checked out (pool_cycle's cursor
# timer), and poolwatch would rightly report one the garbage collector returns.
_KEEP_ALIVE: list[Timer] = []


def wall_clock(
    args: argparse.Namespace, names: Sequence[str], baseline: str, cycles: int
) -> pool_cycle.Result:
    import pool_cycle

    timers = {name: UNITS[name].build(args) for name in names}
    _KEEP_ALIVE.extend(timers.values())
    return pool_cycle.measure(timers, args.rounds, cycles, baseline)


# --------------------------------------------------------------------------------------------
# Breakdown: callgrind's C functions, default minus bare
# --------------------------------------------------------------------------------------------

INTERPRETER = "the bytecode loop (ceval.c)"


@dataclass
class Profile:
    """One callgrind file by C function: own instructions, and own plus those of its callees."""

    self_cost: dict[str, float]
    inclusive: dict[str, float]


def read_profile(path: Path) -> Profile:
    """Parse callgrind's output format (positions: line; events: Ir) without callgrind_annotate.

    Own cost is keyed by function, except that every line compiled from ceval.c (the bytecode
    loop, which this build's symbols sometimes file under a neighbouring function) is one row.
    Inclusive cost is a function's own cost plus its calls to other functions.
    """
    names: dict[tuple[str, str], str] = {}

    def resolve(space: str, text: str) -> str:
        text = text.strip()
        if text.startswith("("):
            key, _, name = text[1:].partition(")")
            if name.strip():
                names[space, key] = name.strip()
            return names.get((space, key), "?")
        return text

    self_cost: dict[str, float] = {}
    own: dict[str, float] = {}
    calls: dict[str, float] = {}
    function = file = object_file = ""
    callee = ""
    in_call = False
    with path.open(errors="replace") as lines:
        for line in lines:
            head = line[:1]
            if head.isdigit() or head in "+-*":
                fields = line.split()
                cost = int(fields[1]) if len(fields) > 1 else 0
                if in_call:
                    in_call = False
                    if callee != function:
                        calls[function] = calls.get(function, 0) + cost
                    continue
                own[function] = own.get(function, 0) + cost
                bare_name = function.split("'")[0]
                key = (
                    INTERPRETER
                    if file.endswith("ceval.c") or bare_name == "_PyEval_EvalFrameDefault"
                    else bare_name
                )
                self_cost[key] = self_cost.get(key, 0) + cost
            elif line.startswith("fn="):
                function = resolve("fn", line[3:])
                file = object_file
            elif line.startswith("fl="):
                object_file = file = resolve("fl", line[3:])
            elif line.startswith(("fi=", "fe=")):
                file = resolve("fl", line[3:])
            elif line.startswith("cfn="):
                callee = resolve("fn", line[4:])
            elif line.startswith(("cfi=", "cfl=")):
                resolve("fl", line[4:])
            elif line.startswith(("ob=", "cob=")):
                resolve("ob", line.split("=", 1)[1])
            elif line.startswith("calls="):
                in_call = True
    inclusive = {name: own.get(name, 0) + calls.get(name, 0) for name in own.keys() | calls.keys()}
    return Profile(self_cost, inclusive)


def per_operation(low: dict[str, float], high: dict[str, float], operations: int) -> dict[str, float]:
    return {name: (high.get(name, 0) - low.get(name, 0)) / operations for name in high.keys() | low.keys()}


def unit_profile(
    counts: dict[tuple[str, int, int], Count], unit: str, ns: tuple[int, int], seed: int
) -> Profile:
    """Per-operation profile of a unit: the N2 run's profile minus the N1 run's, over N2 - N1."""
    low = read_profile(counts[unit, ns[0], seed].files[0])
    high = read_profile(counts[unit, ns[1], seed].files[0])
    operations = ns[1] - ns[0]
    return Profile(
        per_operation(low.self_cost, high.self_cost, operations),
        per_operation(low.inclusive, high.inclusive, operations),
    )


# C functions that stand for one Python-level operation of the wrappers (inclusive cost).
ENTRY_POINTS = [
    ("dict_get", "dict.get(), the borrow-site cache's code-object key hashed included"),
    ("code_hash", "hashing a code object (not cached by CPython 3.11): the borrow-site cache key"),
    ("_bisect_bisect_left", "bisect_left(): keyword parsing, generic float compares"),
    ("rlock_acquire", "RLock.acquire() (SQLAlchemy's queue takes one too)"),
    ("vgetargskeywords", "argument parsing, mostly acquire()'s blocking/timeout keywords"),
    ("rlock_release", "RLock.release()"),
    ("time_perf_counter", "time.perf_counter()"),
    ("count_next", "next(itertools.count())"),
    ("PySequence_Contains", "`in`: checkout table, leaked set"),
    ("dict_pop", "dict.pop() (checkout table; SQLAlchemy's own too)"),
    ("_contextvars_ContextVar_get", "ContextVar.get(): the current request"),
    ("sys__getframe", "sys._getframe()"),
    ("_contextvars_copy_context", "contextvars.copy_context()"),
    ("PyFloat_FromDouble", "making floats (times, durations, sums)"),
    ("tupledealloc", "freeing tuples (the checkout entry among them)"),
]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    from _common import table as markdown_table

    return markdown_table(header, rows)


def pair(values: Sequence[int]) -> tuple[int, int]:
    return values[0], values[1]


def fmt_count(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def spread(values: Sequence[float]) -> str:
    if len(values) < 2:
        return ""
    return f"{min(values):,.0f}-{max(values):,.0f}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=os.environ.get("POOLWATCH_TEST_DATABASE_URL", DEFAULT_URL),
                        help="PostgreSQL server (psycopg is used)")  # fmt: skip
    parser.add_argument("--dbapi", choices=("psycopg", "fake"), default="psycopg",
                        help="pool rows over real psycopg connections, or over do-nothing fakes")  # fmt: skip
    parser.add_argument("--sections", nargs="+", default=["pool", "statement", "request", "breakdown"],
                        choices=("pool", "statement", "request", "breakdown"))  # fmt: skip
    parser.add_argument("--cycles", nargs=2, type=int, default=[500, 2500], metavar=("N1", "N2"),
                        help="pool cycles and statements under callgrind")  # fmt: skip
    parser.add_argument("--requests", nargs=2, type=int, default=[20, 100], metavar=("N1", "N2"))
    parser.add_argument("--ops", nargs=2, type=int, default=[2000, 12000], metavar=("N1", "N2"),
                        help="iterations of each micro-operation loop")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="PYTHONHASHSEED of each pool/statement pair (one pair per seed)")  # fmt: skip
    parser.add_argument("--request-seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="PYTHONHASHSEED of each request pair: the spread of the per-request figure")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=2, help="callgrind processes at a time")
    parser.add_argument("--rounds", type=int, default=21, help="wall-clock: paired rounds")
    parser.add_argument("--wall-cycles", type=int, default=2000, help="wall-clock: cycles per round")
    parser.add_argument("--wall-requests", type=int, default=200, help="wall-clock: requests per round")
    parser.add_argument("--cache-sim", action="store_true",
                        help="request rows also simulate caches and branch prediction (slower)")  # fmt: skip
    parser.add_argument("--no-valgrind", action="store_true", help="wall-clock only, no instruction counts")
    parser.add_argument("--keep", type=Path, default=None, help="keep the callgrind files in this directory")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per callgrind process")
    # Internal: one measured process.
    parser.add_argument("--child", choices=[*sorted(UNITS), OPS_CHILD], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--n2", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--control", choices=("client-requests", "whole-run"), default="whole-run",
                        help=argparse.SUPPRESS)  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    if not args.no_valgrind and shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install -y valgrind), or use --no-valgrind")
    from _common import print_header

    args.control = "client-requests" if client_requests_usable() else "whole-run"
    print_header("poolwatch hot path in instructions (callgrind) and wall-clock")
    print(f"- pool DBAPI: {args.dbapi}; counting: {args.control}; seeds {args.seeds}, "
          f"request seeds {args.request_seeds}")  # fmt: skip
    with contextlib.ExitStack() as stack:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            out_dir = args.keep
        else:
            out_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="poolwatch-cg-")))
        report(args, out_dir)


def report(args: argparse.Namespace, out_dir: Path) -> None:
    sections = set(args.sections)
    cycles = pair(args.cycles)
    plan: list[tuple[str, tuple[int, int], list[int]]] = []
    if sections & {"pool", "breakdown"}:
        plan += [(name, cycles, args.seeds) for name in SECTION_UNITS["pool"]]
    if "statement" in sections:
        plan += [(name, cycles, args.seeds) for name in SECTION_UNITS["statement"]]
    if "request" in sections:
        plan += [
            (
                name,
                pair(args.requests),
                args.request_seeds
                if name not in ("request_watch", "request_pw_no_site")
                else args.request_seeds[:1],
            )
            for name in SECTION_UNITS["request"]
        ]
    if "breakdown" in sections:
        plan += [(name, pair(args.ops), args.seeds[:1]) for name in SECTION_UNITS["op"]]
    per_op: dict[str, PerOp] = {}
    counts: dict[tuple[str, int, int], Count] = {}
    if not args.no_valgrind:
        per_op, counts = count_all(args, plan, out_dir)
        COUNTS.update(counts)

    def instr(name: str) -> float | None:
        return per_op[name].median if name in per_op else None

    if sections & {"pool", "breakdown"}:
        pool_table(args, per_op, instr)
    if "statement" in sections:
        statement_table(args, instr)
    if "request" in sections:
        request_table(args, per_op, instr)
    if "breakdown" in sections and per_op:
        breakdown(args, per_op, counts, instr)
    from _common import command_line

    print(f"\nreproduce: `{command_line()}`")


def pool_table(
    args: argparse.Namespace, per_op: dict[str, PerOp], instr: Callable[[str], float | None]
) -> None:
    names = SECTION_UNITS["pool"]
    via_pool = [name for name in names if not name.startswith("engine_")]
    via_engine = [name for name in names if name.startswith("engine_")]
    wall = wall_clock(args, via_pool, "bare", args.wall_cycles)
    wall_engine = wall_clock(args, via_engine, "engine_bare", args.wall_cycles)
    bare = instr("bare")
    rows = []
    for name in names:
        base_name = "engine_bare" if name in via_engine else "bare"
        base = instr(base_name)
        value = instr(name)
        walls = wall_engine if name in via_engine else wall
        rows.append([
            UNITS[name].label,
            fmt_count(value),
            "n/a" if value is None or not base else f"{value / base:.3f}x",
            "n/a" if value is None or base is None else f"{value - base:+,.0f}",
            spread(per_op[name].values) if name in per_op else "",
            f"{walls.seconds[name] * 1e6:.2f}",
            f"{walls.ratios[name]:.2f}x",
        ])  # fmt: skip
    print(f"\n## Pool checkout + checkin (`pool.connect().close()`, QueuePool, {args.dbapi})\n")
    print(table(
        ["configuration", "instructions / cycle", "ratio to bare", "vs bare", "seed spread",
         "wall us / cycle (median)", "wall ratio (paired median)"],
        rows,
    ))  # fmt: skip
    if bare:
        ipus = RATES["pool"] = bare / (wall.seconds["bare"] * 1e6)
        print(f"\ncallgrind: N = {args.cycles[0]} and {args.cycles[1]} cycles, main thread; "
              f"wall-clock: {args.rounds} paired rounds x {args.wall_cycles} cycles. "
              f"This machine ran the bare cycle at {ipus:,.0f} instructions per us. "
              "Rows via engine.connect() are compared with the bare engine.connect() cycle.")  # fmt: skip


def statement_table(args: argparse.Namespace, instr: Callable[[str], float | None]) -> None:
    pairs = [("do_execute_bare", "do_execute_pw"), ("exec_sql_bare", "exec_sql_pw")]
    rows = []
    for bare_name, pw_name in pairs:
        wall = wall_clock(args, [bare_name, pw_name], bare_name, args.wall_cycles * 5)
        bare, pw = instr(bare_name), instr(pw_name)
        ipus = bare / (wall.seconds[bare_name] * 1e6) if bare else None
        for name, value in ((bare_name, bare), (pw_name, pw)):
            delta = None if value is None or bare is None else value - bare
            rows.append([
                UNITS[name].label,
                fmt_count(value),
                "" if delta is None or name == bare_name else f"{delta:+,.0f}",
                "" if delta is None or not ipus or name == bare_name else f"{delta / ipus:+.2f}",
                f"{wall.seconds[name] * 1e6:.2f}",
                "" if name == bare_name else f"{wall.differences[name] * 1e6:+.2f}",
            ])  # fmt: skip
    print("\n## Per statement (in-memory SQLite, `SELECT 1`)\n")
    print(table(
        ["path", "instructions / statement", "vs bare", "vs bare, us (at this machine's rate)",
         "wall us / statement (median)", "wall vs bare, us (paired median)"],
        rows,
    ))  # fmt: skip
    print("\nTarget: <= 0.8 us per statement for the do_execute wrapper (classification, histogram).")


def request_table(
    args: argparse.Namespace, per_op: dict[str, PerOp], instr: Callable[[str], float | None]
) -> None:
    names = ["request_bare", "request_pw"]
    modes = {"request_bare": "bare", "request_pw": "instrument"}
    drivers = {name: RequestDriver(request_app(args, modes[name])) for name in names}
    samples: dict[str, dict[str, list[float]]] = {
        kind: {name: [] for name in names} for kind in ("wall", "cpu", "user")
    }
    for driver in drivers.values():
        driver.run(max(20, args.wall_requests // 4))  # warm-up
    for _ in range(args.rounds):
        order = list(names)
        random.shuffle(order)
        for name in order:
            gc.collect()
            samples["wall"][name].append(drivers[name].run(args.wall_requests))
            samples["cpu"][name].append(drivers[name].cpu_per_request)
            samples["user"][name].append(drivers[name].user_per_request)

    def median_us(kind: str, name: str) -> float:
        return statistics.median(samples[kind][name]) * 1e6

    def paired_us(kind: str) -> tuple[float, float, float]:
        paired = [
            p - b for p, b in zip(samples[kind]["request_pw"], samples[kind]["request_bare"], strict=True)
        ]
        quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
        return statistics.median(paired) * 1e6, quartiles[0] * 1e6, quartiles[2] * 1e6

    print("\n## Per request (FastAPI, one SELECT on a sync psycopg engine, httpx ASGITransport)\n")
    rows = [
        [UNITS[name].label, fmt_count(instr(name)), spread(per_op[name].values) if name in per_op else "",
         f"{median_us('user', name):.1f}", f"{median_us('cpu', name):.1f}", f"{median_us('wall', name):.1f}"]
        for name in names
    ]  # fmt: skip
    for position, extra in ((1, "request_watch"), (2, "request_noop"), (4, "request_pw_no_site")):
        if extra in per_op:
            rows.insert(position, [UNITS[extra].label, fmt_count(instr(extra)), "", "", "", ""])
    print(table(["configuration", "instructions / request (median of seeds)", "seed spread",
                 "user CPU us (main thread)", "CPU us (process)", "wall us"], rows))  # fmt: skip
    print()
    bare = instr("request_bare")
    if bare is not None and "request_pw" in per_op:
        deltas = [
            p - b for p, b in zip(per_op["request_pw"].values, per_op["request_bare"].values, strict=True)
        ]
        delta = statistics.median(deltas)
        rate = bare / median_us("user", "request_bare")
        line = (f"- poolwatch per request, counted: {delta:+,.0f} instructions, seeds {args.request_seeds}: "
                f"{', '.join(f'{d:+,.0f}' for d in deltas)}.\n"
                f"  At this path's own rate ({rate:,.0f} instructions per us of user CPU, bare): "
                f"{delta / rate:+.2f} us (seeds {min(deltas) / rate:+.2f} to {max(deltas) / rate:+.2f} us).")  # fmt: skip
        pool_rate = RATES.get("pool")
        if pool_rate:
            line += (f"\n  At the pool loop's rate ({pool_rate:,.0f} per us; poolwatch's own code is small "
                     f"and hot, like that loop): {delta / pool_rate:+.2f} us.")  # fmt: skip
        watch_only = instr("request_watch")
        if watch_only is not None:
            line += (f"\n  Of that, the engine's hooks (checkout, checkin, statement, borrow-site walk): "
                     f"{watch_only - bare:+,.0f}; the middleware and what a request context adds: "
                     f"{deltas[0] - (watch_only - bare):+,.0f} (seed {args.request_seeds[0]}).")  # fmt: skip
        no_site = instr("request_pw_no_site")
        if no_site is not None:
            line += (f"\n  With leak detection off (no borrow-site walk): {no_site - bare:+,.0f} instructions, "
                     f"{(no_site - bare) / rate:+.2f} us at the same rate.")  # fmt: skip
        noop = instr("request_noop")
        if watch_only is not None and noop is not None:
            line += (f"\n  A do-nothing ASGI middleware layer costs {noop - watch_only:+,.0f} of that; "
                     f"poolwatch's middleware and request context beyond it: "
                     f"{deltas[0] - (noop - bare):+,.0f}.")  # fmt: skip
        print(line)
    if args.cache_sim and per_op:
        cache_table(args, drivers_user_us=median_us("user", "request_bare"))
    for kind, label in (("user", "user CPU, main thread"), ("cpu", "CPU, process"), ("wall", "wall")):
        median, low, high = paired_us(kind)
        print(f"- poolwatch per request, {label}, paired rounds ({args.rounds} x {args.wall_requests}): "
              f"{median:+.1f} us median, interquartile range {low:+.1f} to {high:+.1f} us")  # fmt: skip
    print("- target: <= +10 us CPU per request")


# Callgrind's events, and KCachegrind's cycle estimate: Ir + 10 x (L1 misses + mispredicted
# branches) + 100 x last-level misses. The weights are a rule of thumb, not this CPU's.
CACHE_EVENTS = [
    ("Ir", "instructions"), ("I1mr", "L1 instruction misses"), ("D1mr", "L1 data read misses"),
    ("D1mw", "L1 data write misses"), ("ILmr", "last-level instruction misses"),
    ("DLmr", "last-level data read misses"), ("Bcm", "conditional branches mispredicted"),
    ("Bim", "indirect branches mispredicted"),
]  # fmt: skip


def cycle_estimate(events: dict[str, float]) -> float:
    l1 = events.get("I1mr", 0) + events.get("D1mr", 0) + events.get("D1mw", 0)
    last_level = events.get("ILmr", 0) + events.get("DLmr", 0) + events.get("DLmw", 0)
    return events.get("Ir", 0) + 10 * (l1 + events.get("Bcm", 0) + events.get("Bim", 0)) + 100 * last_level


def cache_table(args: argparse.Namespace, drivers_user_us: float) -> None:
    """Per request, every simulated event, bare and poolwatch (first request seed)."""
    seed = args.request_seeds[0]
    n1, n2 = pair(args.requests)
    counts = COUNTS

    def per_request(unit: str) -> dict[str, float]:
        low, high = counts[unit, n1, seed].events, counts[unit, n2, seed].events
        return {name: (high.get(name, 0) - low.get(name, 0)) / (n2 - n1) for name in high}

    bare, pw = per_request("request_bare"), per_request("request_pw")
    rows = [[label, f"{bare.get(name, 0):,.0f}", f"{pw.get(name, 0):,.0f}", f"{pw.get(name, 0) - bare.get(name, 0):+,.0f}"]
            for name, label in CACHE_EVENTS]  # fmt: skip
    estimate_bare, estimate_pw = cycle_estimate(bare), cycle_estimate(pw)
    rows.append(["cycle estimate (Ir + 10 x (L1 misses + mispredictions) + 100 x LL misses)",
                 f"{estimate_bare:,.0f}", f"{estimate_pw:,.0f}", f"{estimate_pw - estimate_bare:+,.0f}"])  # fmt: skip
    print(f"\nSimulated caches and branch predictor, per request (seed {seed}):\n")
    print(table(["event", "bare", "poolwatch", "difference"], rows))
    rate = estimate_bare / drivers_user_us
    print(f"\n  The estimate runs at {rate:,.0f} per us of the bare path's user CPU here: poolwatch "
          f"{(estimate_pw - estimate_bare) / rate:+.2f} us per request.")  # fmt: skip


def breakdown(
    args: argparse.Namespace,
    per_op: dict[str, PerOp],
    counts: dict[tuple[str, int, int], Count],
    instr: Callable[[str], float | None],
) -> None:
    loop = instr("op_loop") or 0.0
    print("\n## Where the instructions go: each Python operation of the two pool wrappers\n")
    print("Each row is a micro-loop counted the same way (instructions per iteration minus the empty "
          "loop), times how often the wrappers do it per cycle with default settings.\n")  # fmt: skip
    # How many times per checkout + checkin poolwatch's default wrappers do each operation.
    uses = {
        "call_through": 2, "perf_counter": 3, "contextvar_get": 1, "idea_site_by_file": 1,
        "copy_context": 1, "entry_tuple": 1, "attr_load": 5, "histogram": 3, "attr_increment": 2,
        "table": 1, "entry_fields": 1, "route_lookup": 1, "weakref": 1, "set_member": 1,
    }  # fmt: skip
    rows = []
    total = 0.0
    for name, label, _ in OPS:
        value = instr(f"op_{name}")
        if value is None or name == "loop":
            continue
        own = value - loop
        if name == "call_through":
            own = value - (instr("op_call_direct") or 0.0)
        times = uses.get(name, 0)
        if times:
            total += own * times
        rows.append(
            (
                own * times,
                [label, f"{own:,.0f}", str(times) if times else "-", f"{own * times:,.0f}" if times else "-"],
            )
        )
    rows.sort(key=lambda row: -row[0])
    print(
        table(["operation", "instructions each", "per cycle", "instructions / cycle"], [r for _, r in rows])
    )
    measured = (instr("default") or 0) - (instr("bare") or 0)
    print(f"\nSum of the operations above: {total:,.0f} per cycle; measured default - bare: {measured:,.0f} "
          f"(the rest: attribute and global loads, comparisons, branches, the try blocks' bookkeeping).")  # fmt: skip

    seed = args.seeds[0]
    ns = pair(args.cycles)
    print("\n## Where the instructions go: callgrind's C functions, default minus bare, per cycle\n")
    default = unit_profile(counts, "default", ns, seed)
    bare = unit_profile(counts, "bare", ns, seed)
    delta = {name: default.self_cost.get(name, 0) - bare.self_cost.get(name, 0)
             for name in default.self_cost.keys() | bare.self_cost.keys()}  # fmt: skip
    top = sorted(delta.items(), key=lambda item: -abs(item[1]))[:24]
    print(table(["C function (own instructions)", "default", "bare", "difference"],
                [[f"`{name}`", f"{default.self_cost.get(name, 0):,.0f}", f"{bare.self_cost.get(name, 0):,.0f}",
                  f"{value:+,.0f}"] for name, value in top]))  # fmt: skip
    print(f"\nSum of all differences: {sum(delta.values()):+,.0f} per cycle.")
    print("\nInclusive cost (own + callees) of the C functions behind the wrappers' calls, per cycle:\n")
    print(table(["C function (inclusive)", "stands for", "default", "bare", "difference"],
                [[f"`{name}`", meaning, f"{default.inclusive.get(name, 0):,.0f}", f"{bare.inclusive.get(name, 0):,.0f}",
                  f"{default.inclusive.get(name, 0) - bare.inclusive.get(name, 0):+,.0f}"]
                 for name, meaning in ENTRY_POINTS]))  # fmt: skip


if __name__ == "__main__":
    main()
