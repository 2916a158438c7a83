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

import math
import time
import weakref
from collections.abc import Iterable
from types import CodeType
from typing import TYPE_CHECKING, Any

from .._record.context import NO_REQUEST, RequestContext
from .._record.events import Event, describe_site, recent
from .._record.histogram import HistogramCopy
from .._record.recorder import RecorderSnapshot
from .collector import read_pool_state
from .history import WINDOW_SECONDS, PoolHistory, Sample
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


class StateBuilder:
    """Builds the JSON payload; keeps the pools' histories between reads."""

    def __init__(self) -> None:
        self._histories: weakref.WeakKeyDictionary[PoolRecorder, PoolHistory] = weakref.WeakKeyDictionary()

    def build(
        self, recorders: Iterable[tuple[str, PoolRecorder]], requests: RequestStats | None
    ) -> dict[str, Any]:
        now_wall = time.time()
        pools = []
        use_by_route: dict[str, list[float]] = {}  # route -> [seconds held, checkins]
        names = set()
        for name, recorder in recorders:
            names.add(name)
            pools.append(self._pool(name, recorder, use_by_route))
        queries = requests.snapshot() if requests is not None else {}
        return {
            "format": FORMAT,
            "generated_at": round(now_wall, 3),
            "window_seconds": WINDOW_SECONDS,
            "pools": pools,
            "routes_by_connection_time": _routes_by_connection_time(use_by_route),
            "routes_by_queries": _routes_by_queries(queries),
            "events": _events(recent(), names),
        }

    def _pool(
        self, name: str, recorder: PoolRecorder, use_by_route: dict[str, list[float]]
    ) -> dict[str, Any]:
        snap = recorder.snapshot()
        state = read_pool_state(recorder, snap.live.count)
        now = time.monotonic()
        held_seconds, held_count = _add_use(snap, use_by_route)
        sample = Sample(
            at=now,
            used=state.used,
            idle=state.idle,
            pending=snap.pending,
            checkouts=snap.checkouts,
            timeouts=snap.timeouts,
            wait_counts=tuple(snap.wait.counts),
            held_seconds=held_seconds,
            held_count=held_count,
        )
        history = self._histories.get(recorder)
        if history is None:
            history = self._histories[recorder] = PoolHistory()
        history.add(sample)
        samples = history.samples()
        if not samples or samples[-1] is not sample:
            samples.append(sample)
        window = _window(samples, snap.wait.bounds)
        pool = recorder.pool
        out, connections = _connections(recorder)
        sizing = advise(state.max, window, snap.live.leaked)
        first = samples[0].at
        return {
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
                "pending": snap.pending,
                "oldest_checkout_seconds": round(snap.live.oldest_age, 3),
                "leaked": snap.live.leaked,
            },
            "history": {
                "seconds_ago": [round(now - s.at, 1) for s in samples],
                "used": [s.used for s in samples],
                "idle": [s.idle for s in samples],
                "pending": [s.pending for s in samples],
            },
            "window": {
                "seconds": round(window.seconds, 1),
                "since_seconds_ago": round(now - first, 1),
                "checkouts": window.checkouts,
                "timeouts": window.timeouts,
                "wait_p95_seconds": _round(window.wait_p95, 6),
                "checkout_rate_per_second": round(window.checkout_rate, 3),
                "mean_hold_seconds": _round(window.mean_hold, 6),
                "mean_in_use": round(window.mean_in_use, 3),
                "mean_used_sampled": round(window.mean_used, 3),
                "peak_used": window.peak_used,
                "max_pending": window.max_pending,
            },
            "sizing": {
                "verdict": sizing.verdict,
                "reason": sizing.reason,
                "suggested_max": sizing.suggested_max,
            },
            "connections_out": out,
            "connections": connections,
        }


def _add_use(snap: RecorderSnapshot, use_by_route: dict[str, list[float]]) -> tuple[float, int]:
    """Totals of the hold-time histograms, added per route to ``use_by_route`` as well."""
    held_seconds = 0.0
    held_count = 0
    for route, copy in snap.use.items():
        count = sum(copy.counts)
        held_seconds += copy.total
        held_count += count
        if count:
            totals = use_by_route.get(route)
            if totals is None:
                totals = use_by_route[route] = [0.0, 0]
            totals[0] += copy.total
            totals[1] += count
    return held_seconds, held_count


def _window(samples: list[Sample], wait_bounds: tuple[float, ...]) -> Window:
    first, last = samples[0], samples[-1]
    seconds = last.at - first.at
    checkouts = last.checkouts - first.checkouts
    held = last.held_seconds - first.held_seconds
    returned = last.held_count - first.held_count
    waits = [b - a for a, b in zip(first.wait_counts, last.wait_counts, strict=True)]
    return Window(
        seconds=seconds,
        checkouts=checkouts,
        timeouts=last.timeouts - first.timeouts,
        wait_p95=quantile(0.95, wait_bounds, waits),
        checkout_rate=returned / seconds if seconds > 0 else 0.0,
        mean_hold=held / returned if returned > 0 else None,
        mean_in_use=held / seconds if seconds > 0 else 0.0,
        peak_used=max(s.used for s in samples),
        mean_used=sum(s.used for s in samples) / len(samples),
        max_pending=max(s.pending for s in samples),
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

# (id(code), offset) -> (code, site, function): a site is described once, not once per read. The
# code object is kept in the value so a reused id is never taken for another function.
_sites: dict[tuple[int, int], tuple[CodeType, str, str]] = {}
_MAX_SITES = 4096


def _site(site: tuple[CodeType, int] | None) -> tuple[str, str]:
    if site is None:
        return describe_site(None)
    code, offset = site
    key = (id(code), offset)
    known = _sites.get(key)
    if known is not None and known[0] is code:
        return known[1], known[2]
    where, function = describe_site(site)
    if len(_sites) >= _MAX_SITES:
        _sites.clear()
    _sites[key] = (code, where, function)
    return where, function


def _connections(recorder: PoolRecorder) -> tuple[int, list[dict[str, Any]]]:
    """How many checkouts are out now, and a row for each (oldest first, up to a bound)."""
    # A C-level copy, no lock: a checkin nested here by the garbage collector cannot break it.
    entries = list(recorder.open_checkouts.values())
    entries.sort(key=_started)
    now = perf_counter()
    threshold = recorder.leak_threshold
    rows = []
    for entry in entries[:MAX_ROWS_PER_POOL]:
        age = now - entry[0]
        request: RequestContext | None = entry[1]
        site, function = _site(entry[3])
        # The dialect hook's running count, once the capture side keeps one (a trailing field).
        usage = entry[7] if len(entry) > 7 else None
        rows.append(
            {
                "age_seconds": round(age, 3),
                "route": NO_REQUEST if request is None else request.route,
                "method": _method(request),
                "site": site,
                "function": function,
                "statements": None if usage is None else int(usage[0]),
                "statement_seconds": None if usage is None else round(float(usage[1]), 6),
                "leaked": threshold > 0 and age > threshold,
            }
        )
    return len(entries), rows


def _started(entry: tuple[Any, ...]) -> float:
    return float(entry[0])


def _method(request: RequestContext | None) -> str:
    if request is None:
        return NO_REQUEST
    method = request.scope.get("method")
    return method if isinstance(method, str) else NO_REQUEST


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


def _routes_by_queries(queries: dict[str, HistogramCopy]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for route, copy in queries.items():
        requests = sum(copy.counts)
        if not requests:
            continue
        p95 = quantile(0.95, copy.bounds, copy.counts)
        rows.append(
            {
                "route": route,
                "requests": requests,
                "queries_per_request": round(copy.total / requests, 2),
                "queries_p95": None if p95 is None else math.ceil(p95),
            }
        )
    rows.sort(key=lambda row: row["queries_per_request"], reverse=True)
    return rows[:MAX_ROUTES]


# -- events ----------------------------------------------------------------------------------------

_PREFIX = "poolwatch."


def _events(events: list[tuple[float, Event]], pools: set[str]) -> list[dict[str, Any]]:
    """The last events about these pools, newest first, without stacks."""
    rows: list[dict[str, Any]] = []
    for at, event in reversed(events):
        if event.pool not in pools:
            continue
        fields = event.fields()
        fields.pop("stack", None)
        kind = event.name[len(_PREFIX) :] if event.name.startswith(_PREFIX) else event.name
        rows.append({"time": round(at, 3), "kind": kind, "level": event.level, **fields})
        if len(rows) >= MAX_EVENTS:
            break
    return rows


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
