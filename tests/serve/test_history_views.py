"""The live page's history of a pool, built from the sampler's rows: the recent series, the long
(per-minute) series, and the totals the sizing hint reads, over rows whose every number is known.

tests/serve/test_sizing_live.py fills the rows from real traffic, a second at a time, and so never
reaches a long row (a minute); here rows are added as the sampler adds them, past two long rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import poolwatch
from poolwatch._record.intervals import LONG_ROW_INTERVALS, PoolIntervals, Row
from poolwatch._serve.history import HistoryViews


@pytest.fixture
def intervals(sync_url: str, registry: CollectorRegistry) -> Iterator[PoolIntervals]:
    engine = sa.create_engine(sync_url)
    watch = poolwatch.watch(engine, registry=registry, name="history")
    (recorder,) = watch.recorders
    yield PoolIntervals(recorder)
    watch.close()
    engine.dispose()


def row(n: int) -> Row:
    """Row n: n % 5 in use at its end, a peak of n % 7, n % 3 queued at most, n checkouts, held
    n / 10 connection-seconds, a wait in its first bucket every tenth row."""
    return Row(
        end=1000.0 + n,
        seconds=1.0,
        intervals=1,
        used=n % 5,
        idle=1,
        peak_used=n % 7,
        peak_queued=n % 3,
        checkouts=n,
        timeouts=1 if n == 65 else 0,
        held=n / 10,
        waits=(1, 0) if n % 10 == 0 else (),
    )


def test_the_recent_and_long_series_and_what_is_kept(intervals: PoolIntervals) -> None:
    count = 2 * LONG_ROW_INTERVALS + 10  # two long rows and ten seconds of the third
    for n in range(count):
        intervals.add(row(n))
    view = HistoryViews().view(intervals)

    assert view.version == count
    assert view.used_json == ",".join(str(n % 5) for n in range(count))
    assert view.pending_json == ",".join(str(n % 3) for n in range(count))
    assert view.peak_used_json == ",".join(str(n % 7) for n in range(count))
    assert view.ends == tuple(1000.0 + n for n in range(count))
    assert view.mean_used == sum(n % 5 for n in range(count)) / count

    # One point per minute: the peak over it, and its mean in use (held / seconds).
    first, second = range(0, 60), range(60, 120)
    assert view.long.peak_used_json == f"{max(n % 7 for n in first)},{max(n % 7 for n in second)}"
    assert view.long.peak_pending_json == "2,2"
    assert view.long.mean_in_use_json == f"{sum(first) / 10 / 60:.2f},{sum(second) / 10 / 60:.2f}"
    assert view.long.ends == (1059.0, 1119.0)
    assert (
        view.filling is not None
        and view.filling.intervals == 10
        and view.filling.checkouts == sum(range(120, 130))
    )

    # Everything kept, as one: the long rows and the one being filled.
    kept = view.kept
    assert kept is not None
    assert (kept.seconds, kept.intervals, kept.checkouts, kept.timeouts) == (130.0, 130, sum(range(count)), 1)
    assert kept.held == pytest.approx(sum(range(count)) / 10)
    assert kept.peak_used == 6 and kept.peak_queued == 2
    assert kept.waits == (13, 0)
    window = view.window
    assert window is not None and (window.seconds, window.checkouts) == (130.0, sum(range(count)))


def test_before_the_first_long_row_only_the_row_being_filled_is_kept(intervals: PoolIntervals) -> None:
    for n in range(5):
        intervals.add(row(n))
    view = HistoryViews().view(intervals)
    assert view.long.ends == () and view.long.merged is None
    assert view.kept == view.filling
    assert view.kept is not None and view.kept.checkouts == sum(range(5))


def test_a_view_is_rebuilt_when_a_row_comes_and_the_long_view_when_a_long_row_does(
    intervals: PoolIntervals,
) -> None:
    views = HistoryViews()
    for n in range(LONG_ROW_INTERVALS + 5):
        intervals.add(row(n))
    first = views.view(intervals)
    assert views.view(intervals) is first  # nothing new: the same view
    intervals.add(row(65))
    second = views.view(intervals)
    assert second.version == first.version + 1
    assert second.used_json == first.used_json + ",0"
    assert second.long is first.long  # no new long row: the long view is reused
    assert second.kept is not None and second.kept.checkouts == sum(range(66))
    for n in range(66, 2 * LONG_ROW_INTERVALS):
        intervals.add(row(n))
    third = views.view(intervals)
    assert third.long.ends == (1059.0, 1119.0)
    assert third.filling is None
    assert third.kept is not None and third.kept.checkouts == sum(range(120))
    # A reader without any view yet builds the same.
    fresh = HistoryViews().view(intervals)
    assert (fresh.used_json, fresh.long.peak_used_json, fresh.kept) == (
        third.used_json,
        third.long.peak_used_json,
        third.kept,
    )
    views.forget()
    assert views.view(intervals).kept == third.kept
