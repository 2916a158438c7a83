"""The live page's JSON (``<ui_path>/state``): what every pool holds now, and who holds it.

The format is documented in README ("Live page") and versioned by ``"format"``: fields may be added,
none renamed or removed without a new number. Every string in it comes from the recorders (pool
names, route templates, code sites, event fields): never a DSN, an SQL literal or a parameter;
slow statements appear only as fingerprints, stacks not at all (a source line can hold a literal).

Reading is GC-safe the way the collector's is: the table of checkouts is copied at C level
(``list(d.values())``) without taking the recorder's lock, counters come from ``snapshot()``, and
everything else is built from those copies.
"""

from __future__ import annotations

import json
import math
import time
import weakref
from collections.abc import Callable, Iterable
from json.encoder import encode_basestring_ascii
from types import CodeType
from typing import TYPE_CHECKING, Any

from .._record.context import NO_REQUEST, UNMATCHED, RequestContext
from .._record.events import Event, describe_site, recent
from .._record.histogram import HistogramCopy
from .._record.holds import idle_in_transaction
from .._record.intervals import LONG_ROW_INTERVALS, RECENT_ROWS, PoolIntervals, Row, joined, sampler
from .collector import read_pool_state
from .history import HistoryView, HistoryViews, mean_in_use_text
from .sizing import Window, advise

if TYPE_CHECKING:
    from .._record.recorder import PoolRecorder
    from .._record.requests import RequestStats

FORMAT = 1
# Enough for any screen; a pool with more checkouts out says so in "connections_out".
MAX_ROWS_PER_POOL = 500
MAX_ROUTES = 25
MAX_EVENTS = 50

perf_counter = time.perf_counter
_JSON_BOOL = ("false", "true")
# Compact, and refusing NaN (not JSON); the answer is a tree of fresh values, so no cycle check.
encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False, check_circular=False).encode
# A str as a JSON string, escaped to ASCII: the json module's own C function, what encode() calls
# for every string; used directly for the few strings of a checkout's row.
quoted: Callable[[str], str] = encode_basestring_ascii


class StateBuilder:
    """Builds the JSON payload; keeps what it built from the pools' rows between reads."""

    def __init__(self) -> None:
        self.histories = HistoryViews()
        # Rows for a recorder the sampler does not know (its engine was released): none, so the
        # page says "unknown" instead of guessing.
        self._unsampled: weakref.WeakKeyDictionary[PoolRecorder, PoolIntervals] = weakref.WeakKeyDictionary()
        # Per pool: id(checkout entry) -> (entry, its row's fixed part as JSON).
        self._rows: weakref.WeakKeyDictionary[PoolRecorder, dict[int, tuple[tuple[Any, ...], str]]] = (
            weakref.WeakKeyDictionary()
        )
        # id of a recent (time, event) pair -> (that pair, its row as JSON): events never change.
        self._event_rows: dict[int, tuple[tuple[float, Event], str]] = {}

    def build(self, recorders: Iterable[tuple[str, PoolRecorder]], requests: RequestStats | None) -> str:
        """The answer as JSON text.

        Assembled from pieces, each encoded by ``json``: the rows that do not change between reads
        (a checkout's route and site, an event) are encoded once and reused while they last, which
        is most of the answer with hundreds of checkouts out.
        """
        now_wall = time.time()
        pools = []
        use_by_route: dict[str, list[float]] = {}  # route -> [seconds held, checkins]
        names = set()
        for name, recorder in recorders:
            names.add(name)
            pools.append(self._pool(name, recorder, use_by_route))
        queries = requests.exact_snapshot() if requests is not None else {}
        head = {
            "format": FORMAT,
            "generated_at": round(now_wall, 3),
            "window_seconds": RECENT_ROWS * sampler.interval,
            "routes_by_connection_time": _routes_by_connection_time(use_by_route),
            "routes_by_queries": _routes_by_queries(queries),
        }
        events = self._events(recent(), names)
        return f'{encode(head)[:-1]},"pools":[{",".join(pools)}],"events":[{",".join(events)}]}}'

    def forget(self) -> None:
        """Drop what is reused between reads (encoded rows, the history's columns): the next read
        costs what one costs when every checkout, event and sample is new since the last."""
        self._rows.clear()
        self._event_rows = {}
        self.histories.forget()

    def _connections(self, recorder: PoolRecorder) -> tuple[int, list[str], float, int]:
        """How many checkouts are out now, a JSON row for each (oldest first, up to a bound), the
        age of the oldest and how many are past the leak threshold."""
        # A C-level copy, no lock: a checkin nested here by the garbage collector cannot break it.
        entries = list(recorder.open_checkouts.values())
        entries.sort(key=_started)
        now = perf_counter()
        now_wall = time.time()
        threshold = recorder.leak_threshold if recorder.leak_threshold > 0 else math.inf
        oldest = now - entries[0][0] if entries else 0.0
        leaked_count = 0
        for entry in entries:
            if now - entry[0] <= threshold:
                break  # oldest first: the rest are younger
            leaked_count += 1
        # What a checkout's row says besides its age and counts never changes while it is out:
        # encoded once, kept while the checkout is (the cache is rebuilt from this read's rows).
        known = self._rows.get(recorder, {})
        fragments: dict[int, tuple[tuple[Any, ...], str]] = {}
        rows: list[str] = []
        add = rows.append
        for entry in entries[:MAX_ROWS_PER_POOL]:
            age = now - entry[0]
            key = id(entry)
            cached = known.get(key)
            if cached is not None and cached[0] is entry:
                fixed = cached[1]
                fragments[key] = cached
            else:
                fixed, lasting = _fixed_fragment(entry)
                if lasting:
                    fragments[key] = (entry, fixed)
            # The statements so far and their time, as the statement timer keeps them (usage).
            usage = entry[7]
            life = _connection_life(entry, now, now_wall)
            add(
                f"[{int(age * 1000)},{fixed},{int(usage[0])},{int(usage[1] * 1000)},"
                f"{_JSON_BOOL[age > threshold]},{life}]"
            )
        self._rows[recorder] = fragments
        return len(entries), rows, oldest, leaked_count

    def _events(self, events: list[tuple[float, Event]], pools: set[str]) -> list[str]:
        """The last events about these pools as JSON, newest first, without stacks."""
        rows: list[str] = []
        known = self._event_rows
        seen: dict[int, tuple[tuple[float, Event], str]] = {}
        for item in reversed(events):
            if item[1].pool not in pools:
                continue
            cached = known.get(id(item))
            row = cached[1] if cached is not None and cached[0] is item else encode(_event_row(*item))
            seen[id(item)] = (item, row)
            rows.append(row)
            if len(rows) >= MAX_EVENTS:
                break
        self._event_rows = seen
        return rows

    def _pool(self, name: str, recorder: PoolRecorder, use_by_route: dict[str, list[float]]) -> str:
        # Not recorder.snapshot(): that copies every histogram under the lock for Prometheus'
        # exact pairings, and the page needs a few numbers. Each is read here without the lock, in
        # C-level copies, so a count may be one checkin behind another: fine for a page a person
        # reads, and nothing here can meet a checkin that the garbage collector nests inside.
        out, connections, oldest, leaked = self._connections(recorder)
        state = read_pool_state(recorder, out)
        pending = recorder.pending
        _add_use(recorder, use_by_route)
        intervals = sampler.of(recorder)
        if intervals is None:
            intervals = self._unsampled.get(recorder)
            if intervals is None:
                intervals = self._unsampled[recorder] = PoolIntervals(recorder, sampler.interval)
        view = self.histories.view(intervals)
        # The interval under way ends the window and each series: exact up to this read.
        current = intervals.current(recorder)
        window = _window(view, current, intervals.interval, recorder.wait.bounds)
        pool = recorder.pool
        sizing = advise(state.max, window, leaked)
        pool_json = encode(
            {
                "name": name,
                "dialect": recorder.dialect,
                "driver": recorder.driver,
                "pool_class": type(pool).__name__ if pool is not None else "unknown",
                "leak_threshold_seconds": recorder.leak_threshold,
                "now": {
                    "used": state.used,
                    "idle": state.idle,
                    "max": state.max,
                    "overflow": state.overflow,
                    "pending": pending,
                    "oldest_checkout_seconds": round(oldest, 3),
                    "leaked": leaked,
                },
                "window": {
                    "seconds": round(window.seconds, 1),
                    "since_seconds_ago": round(window.seconds, 1),
                    "interval_seconds": window.interval_seconds,
                    "intervals": window.intervals,
                    "checkouts": window.checkouts,
                    "timeouts": window.timeouts,
                    "wait_p95_seconds": _round(window.wait_p95, 6),
                    "checkout_rate_per_second": round(window.checkout_rate, 3),
                    "mean_hold_seconds": _round(window.mean_hold, 6),
                    "mean_in_use": round(window.mean_in_use, 3),
                    "held_connection_seconds": round(window.held_seconds, 3),
                    "mean_used_sampled": round(window.mean_used, 3),
                    "peak_used": window.peak_used,
                    "max_pending": window.max_pending,
                },
                "kept": {
                    "seconds": round(window.kept_seconds, 1),
                    "peak_used": window.kept_peak_used,
                    "max_pending": window.kept_max_pending,
                    "timeouts": window.kept_timeouts,
                },
                "sizing": {
                    "verdict": sizing.verdict,
                    "reason": sizing.reason,
                    "suggested_max": sizing.suggested_max,
                },
                "connections_out": out,
                "connection_fields": CONNECTION_FIELDS,
            }
        )
        series = _history_json(view, current)
        long_series = _long_history_json(view, current, intervals.interval)
        return (
            f'{pool_json[:-1]},"history":{series},"history_long":{long_series},'
            f'"connections":[{",".join(connections)}]}}'
        )


def _add_use(recorder: PoolRecorder, use_by_route: dict[str, list[float]]) -> None:
    """Totals of the hold-time histograms, added per route to ``use_by_route``."""
    use = recorder.use
    # Keys, then values: both C-level copies, and routes are only ever added, so they pair up by
    # position (see the recorder's docstring).
    for (route, _method), histogram in zip(list(use), list(use.values()), strict=False):
        count = histogram.count
        total = histogram.total
        if count:
            totals = use_by_route.get(route)
            if totals is None:
                totals = use_by_route[route] = [0.0, 0]
            totals[0] += total
            totals[1] += count


def _history_json(view: HistoryView, current: Row) -> str:
    """``{"seconds_ago": [...], "used": [...], "idle": [...], "pending": [...], "peak_used": [...]}``:
    one point per interval, oldest first, the interval under way last (``seconds_ago`` 0).
    ``pending`` and ``peak_used`` are each interval's exact peaks; ``used`` and ``idle`` the
    pool at its end."""
    now = current.end
    ages = ",".join([*[str(int(now - end + 0.5)) for end in view.ends], "0"])
    sep = "," if view.ends else ""
    return (
        f'{{"seconds_ago":[{ages}],"used":[{view.used_json}{sep}{current.used}],'
        f'"idle":[{view.idle_json}{sep}{current.idle}],'
        f'"pending":[{view.pending_json}{sep}{current.peak_queued}],'
        f'"peak_used":[{view.peak_used_json}{sep}{current.peak_used}]}}'
    )


def _long_history_json(view: HistoryView, current: Row, interval: float) -> str:
    """Everything kept, one point per long row (a minute at the default interval), oldest first;
    the last point is the long row being filled, with the interval under way."""
    now = current.end
    long = view.long
    filling = current if view.filling is None else joined(view.filling, current)
    ages = ",".join([*[str(int(now - end + 0.5)) for end in long.ends], "0"])
    sep = "," if long.ends else ""
    return (
        f'{{"row_seconds":{LONG_ROW_INTERVALS * interval!r},"seconds_ago":[{ages}],'
        f'"peak_used":[{long.peak_used_json}{sep}{filling.peak_used}],'
        f'"peak_pending":[{long.peak_pending_json}{sep}{filling.peak_queued}],'
        f'"mean_in_use":[{long.mean_in_use_json}{sep}{mean_in_use_text(filling)}]}}'
    )


def _window(view: HistoryView, current: Row, interval: float, wait_bounds: tuple[float, ...]) -> Window:
    """The verdict's window: the recent rows and the interval under way; and the kept history."""
    window = current if view.window is None else joined(view.window, current)
    kept = current if view.kept is None else joined(view.kept, current)
    waits = list(window.waits)
    return Window(
        seconds=window.seconds,
        intervals=window.intervals,
        interval_seconds=interval,
        checkouts=window.checkouts,
        timeouts=window.timeouts,
        wait_p95=quantile(0.95, wait_bounds, waits) if waits else None,
        held_seconds=window.held,
        peak_used=window.peak_used,
        max_pending=window.peak_queued,
        mean_used=view.mean_used if view.mean_used is not None else float(current.used),
        kept_seconds=kept.seconds,
        kept_peak_used=kept.peak_used,
        kept_max_pending=kept.peak_queued,
        kept_timeouts=kept.timeouts,
    )


def quantile(q: float, bounds: tuple[float, ...], counts: list[int]) -> float | None:
    """The q-quantile of a bucket histogram (counts per bucket, the last one +Inf), interpolated
    within its bucket the way Prometheus' ``histogram_quantile`` does."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    running = 0
    for index, count in enumerate(counts):
        if count and running + count >= rank:
            if index >= len(bounds):  # the +Inf bucket: the highest finite bound is all we know
                return bounds[-1]
            lower = bounds[index - 1] if index else 0.0
            return lower + (bounds[index] - lower) * (rank - running) / count
        running += count
    return bounds[-1]


# -- connections out now ---------------------------------------------------------------------------

# (id(code), offset) -> (code, '"file:line","function"'): a site is described and encoded once,
# not once per read. The code object is kept in the value so a reused id is never taken for
# another function.
_sites: dict[tuple[int, int], tuple[CodeType, str]] = {}
_MAX_SITES = 4096
_UNKNOWN_SITE = ",".join(map(quoted, describe_site(None)))


def _site_fragment(site: tuple[CodeType, int] | None) -> str:
    if site is None:
        return _UNKNOWN_SITE
    code, offset = site
    key = (id(code), offset)
    known = _sites.get(key)
    if known is not None and known[0] is code:
        return known[1]
    fragment = ",".join(map(quoted, describe_site(site)))
    if len(_sites) >= _MAX_SITES:
        _sites.clear()
    _sites[key] = (code, fragment)
    return fragment


# The columns of "connections": rows are arrays in this order, which keeps the answer small and
# quick to encode with hundreds of checkouts out (each row as an object repeats every key).
CONNECTION_FIELDS = (
    "age_ms", "method", "route", "site", "function", "statements", "statement_ms", "leaked",
    "connection_age_ms", "uses", "idle_in_transaction_ms", "after_response_ms",
)  # fmt: skip


def _connection_life(entry: tuple[Any, ...], now: float, now_wall: float) -> str:
    """``connection_age_ms,uses,idle_in_transaction_ms,after_response_ms`` of a checkout's row.

    The DBAPI connection's age (SQLAlchemy stamps its record with ``time.time()`` when it opens
    one) and the checkouts it has served; idle inside an open transaction so far; for a checkout
    taken before its response started, the time since it started. ``null`` where unknown."""
    record = entry[5]
    if isinstance(record, int):  # a pool sharing records keys checkouts by their proxy's id
        fairy = entry[2]()  # such an entry always holds a weak reference to its proxy
        record = getattr(fairy, "_connection_record", None)
    started = getattr(record, "starttime", None)
    age = "null"
    if isinstance(started, float) and started > 0:
        age = str(max(0, int((now_wall - started) * 1000)))
    uses = getattr(record, "_poolwatch_uses", None)
    uses_text = str(uses) if isinstance(uses, int) else "null"
    in_transaction = int(idle_in_transaction(entry[7], now) * 1000)
    request: RequestContext | None = entry[1]
    after = "null"
    if request is not None and request.response_started and request.response_started_at > entry[0]:
        after = str(max(0, int((now - request.response_started_at) * 1000)))
    return f"{age},{uses_text},{in_transaction},{after}"


def _fixed_fragment(entry: tuple[Any, ...]) -> tuple[str, bool]:
    """``"method","route","site","function"`` of a checkout's row, as JSON without brackets, and
    whether it lasts: not while the request's route is unknown, since routing may still find it."""
    request: RequestContext | None = entry[1]
    if request is None:
        route = method = NO_REQUEST
    else:
        # The template once routing found it, as the hot path reads it; else resolve it now.
        route = request.resolved_route or request.route
        method = request.method  # the method label: registered methods only, never what a client made up
    return f"{quoted(method)},{quoted(route)},{_site_fragment(entry[3])}", route != UNMATCHED


def _started(entry: tuple[Any, ...]) -> float:
    return float(entry[0])


# -- routes ----------------------------------------------------------------------------------------


def _routes_by_connection_time(use_by_route: dict[str, list[float]]) -> list[dict[str, Any]]:
    ranked = sorted(use_by_route.items(), key=lambda item: item[1][0], reverse=True)[:MAX_ROUTES]
    return [
        {
            "route": route,
            "connection_seconds": round(seconds, 3),
            "checkouts": int(count),
            "mean_hold_seconds": round(seconds / count, 6) if count else None,
        }
        for route, (seconds, count) in ranked
    ]


def _routes_by_queries(
    queries: dict[tuple[str, str], tuple[HistogramCopy, list[int]]],
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for (route, method), (copy, exact) in queries.items():
        requests = sum(copy.counts)
        if not requests:
            continue
        rows.append(
            {
                "route": route,
                "method": method,
                "requests": requests,
                "queries_per_request": round(copy.total / requests, 2),
                "queries_p95": count_quantile(0.95, copy, exact),
            }
        )
    rows.sort(key=lambda row: row["queries_per_request"], reverse=True)
    return rows[:MAX_ROUTES]


def count_quantile(q: float, copy: HistogramCopy, exact: list[int]) -> int | None:
    """The q-quantile of statements per request: exact (the nearest rank, a number some request
    really ran) when it falls among the counts kept per exact number (``RequestStats``); else
    interpolated in the exported power-of-two buckets and rounded up."""
    requests = sum(copy.counts)
    if requests <= 0:
        return None
    rank = max(1, math.ceil(q * requests - 1e-9))
    running = 0
    for statements, count in enumerate(exact):
        running += count
        if running >= rank:
            return statements
    p95 = quantile(q, copy.bounds, copy.counts)
    return None if p95 is None else math.ceil(p95)


# -- events ----------------------------------------------------------------------------------------

_PREFIX = "poolwatch."


def _event_row(at: float, event: Event) -> dict[str, Any]:
    fields = event.fields()
    fields.pop("stack", None)  # a source line can hold a literal
    kind = event.name[len(_PREFIX) :] if event.name.startswith(_PREFIX) else event.name
    return {"time": round(at, 3), "kind": kind, "level": event.level, **fields}


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
