"""The live page's history of a pool, read from the interval sampler's rows (``_record.intervals``).

The rows are kept from the moment the pool is watched, whether or not anyone reads the page, at a
bounded size. What the page builds from them (the charted series as JSON numbers, the window's and
the kept history's totals) changes once per row, so it is built once per row and reused by every
read in between (several tabs may read each second); what it builds from the long rows changes once
per long row (a minute).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from .._record.intervals import PoolIntervals, Row, joined, merge


@dataclass(frozen=True, slots=True)
class LongView:
    """The long rows at one long version: merged, and as JSON numbers without brackets."""

    long_version: int
    merged: Row | None
    ends: tuple[float, ...]
    peak_used_json: str
    peak_pending_json: str
    mean_in_use_json: str


@dataclass(frozen=True, slots=True)
class HistoryView:
    """The rows of one pool at one version, as the page sends them.

    The charted series are JSON number lists without their brackets (``"3,4,4"``): a read only
    joins them with the interval under way.
    """

    version: int
    ends: tuple[float, ...]  # perf_counter() at the end of each recent row, oldest first
    used_json: str  # checkouts out at each row's end
    idle_json: str
    pending_json: str  # callers queued: the row's exact peak (a gauge read at its end would miss it)
    peak_used_json: str
    mean_used: float | None  # the mean of ``used`` over the recent rows
    window: Row | None  # the recent rows as one
    kept: Row | None  # every kept row as one (the long rows and the one being filled)
    long: LongView
    filling: Row | None  # the long row being filled: the long series' last point


_NO_LONG = LongView(-1, None, (), "", "", "")


class HistoryViews:
    """The latest view of each pool's rows, rebuilt when a row is added."""

    def __init__(self) -> None:
        self._views: weakref.WeakKeyDictionary[PoolIntervals, HistoryView] = weakref.WeakKeyDictionary()

    def forget(self) -> None:
        self._views = weakref.WeakKeyDictionary()

    def view(self, intervals: PoolIntervals) -> HistoryView:
        known = self._views.get(intervals)
        if known is not None and known.version == intervals.version:
            return known
        known_long = known.long if known is not None else _NO_LONG
        version, recent, filling, long_version, long_rows = intervals.rows(known_long.long_version)
        long = known_long if long_rows is None else _long_view(long_version, long_rows)
        if long.merged is None:
            kept = filling
        else:
            kept = long.merged if filling is None else joined(long.merged, filling)
        view = HistoryView(
            version=version,
            ends=tuple([row.end for row in recent]),
            used_json=",".join([str(row.used) for row in recent]),
            idle_json=",".join([str(row.idle) for row in recent]),
            pending_json=",".join([str(row.peak_queued) for row in recent]),
            peak_used_json=",".join([str(row.peak_used) for row in recent]),
            mean_used=sum([row.used for row in recent]) / len(recent) if recent else None,
            window=merge(recent),
            kept=kept,
            long=long,
            filling=filling,
        )
        self._views[intervals] = view
        return view


def _long_view(long_version: int, rows: tuple[Row, ...]) -> LongView:
    return LongView(
        long_version=long_version,
        merged=merge(rows),
        ends=tuple([row.end for row in rows]),
        peak_used_json=",".join([str(row.peak_used) for row in rows]),
        peak_pending_json=",".join([str(row.peak_queued) for row in rows]),
        mean_in_use_json=",".join([mean_in_use_text(row) for row in rows]),
    )


def mean_in_use_text(row: Row) -> str:
    """The row's mean checkouts out (connection-seconds held per second) as a JSON number."""
    return f"{row.held / row.seconds:.2f}" if row.seconds > 0 else "0"
