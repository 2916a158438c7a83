"""The sizing hint's rules at their boundaries, with the exact words and numbers a person reads.

tests/serve/test_sizing_live.py plays real bursts and long holds through a pool; tests/serve/
test_live_page.py checks each verdict once. Here every threshold is met exactly and missed by one
(intervals, the limit of 2, half the limit, the busy share, the grow and shrink formulas, the
units of a duration), and the whole sentence is compared, Little's law included.
"""

from __future__ import annotations

import dataclasses

import pytest

from poolwatch._serve.sizing import Sizing, Window, advise

BASE = Window(
    seconds=60.0,
    intervals=60,
    interval_seconds=1.0,
    checkouts=120,
    timeouts=0,
    wait_p95=None,
    held_seconds=30.0,  # 0.5 connections in use on average
    peak_used=2,
    max_pending=0,
    mean_used=0.5,
    kept_seconds=60.0,
    kept_peak_used=2,
    kept_max_pending=0,
    kept_timeouts=0,
)
LAW = "Little's law: 2.0 checkouts/s × 250.0 ms mean hold = 0.5 connections in use on average"


def window(**changes: object) -> Window:
    return dataclasses.replace(BASE, **changes)  # type: ignore[arg-type]


def test_a_pool_without_a_limit_is_unbounded() -> None:
    assert advise(None, BASE) == Sizing(
        "unbounded", "this pool class has no connection limit, so there is nothing to size"
    )


def test_unknown_until_ten_intervals_then_judged() -> None:
    assert advise(10, window(intervals=9, seconds=9.4)) == Sizing(
        "unknown", "watched for 9 s; the hint needs at least 10 s"
    )
    assert advise(10, window(intervals=9, interval_seconds=2.0, seconds=18.0)) == Sizing(
        "unknown", "watched for 18 s; the hint needs at least 20 s"
    )
    assert advise(10, window(intervals=10, seconds=10.0)).verdict != "unknown"


def test_unknown_without_any_connection_taken_but_not_with_one_out_or_queued() -> None:
    idle = window(peak_used=0, checkouts=0, max_pending=0, held_seconds=0.0)
    assert advise(10, idle) == Sizing(
        "unknown", "no connection was taken in the last 60 s: nothing to size yet"
    )
    assert advise(10, window(peak_used=1, checkouts=0, held_seconds=60.0)).verdict != "unknown"
    assert advise(10, window(peak_used=0, checkouts=1)).verdict != "unknown"
    assert advise(10, window(peak_used=0, checkouts=0, max_pending=1)).verdict == "too_small"


def test_a_timeout_is_too_small_and_says_so_first() -> None:
    sizing = advise(10, window(timeouts=3, peak_used=10, max_pending=4, held_seconds=30.0))
    assert sizing == Sizing(
        "too_small",
        "3 checkout(s) timed out in the last 60 s: callers waited pool_timeout for one of the 10 "
        f"connections and gave up. Peak 10 of 10 in use, up to 4 queued. {LAW}.",
        14,  # the peak plus the largest queue
    )


def test_callers_queued_is_too_small_with_the_wait() -> None:
    sizing = advise(10, window(max_pending=1, peak_used=10, wait_p95=0.0125))
    assert sizing == Sizing(
        "too_small",
        "callers queued for a free connection in the last 60 s (up to 1 at once, peak 10 of 10 in "
        f"use, wait p95 12.5 ms). {LAW}.",
        11,  # at least the limit plus one
    )
    assert "wait p95 1.50 s" in advise(10, window(max_pending=1, wait_p95=1.5)).reason
    assert "wait p95 1.00 s" in advise(10, window(max_pending=1, wait_p95=1.0)).reason
    assert "wait p95 999.0 ms" in advise(10, window(max_pending=1, wait_p95=0.999)).reason
    assert "wait p95 n/a" in advise(10, window(max_pending=1, wait_p95=None)).reason


def test_growing_suggests_half_again_the_mean_when_that_is_most() -> None:
    # 12 connections in use on average (a window of held time), limit 10: ceil(12 * 1.5) = 18.
    busy = window(max_pending=1, peak_used=10, held_seconds=720.0)
    assert advise(10, busy).suggested_max == 18


def test_a_leak_note_comes_after_the_reason() -> None:
    sizing = advise(10, window(max_pending=2, peak_used=10), leaked_now=2)
    assert sizing.reason.endswith(
        f"{LAW}. But 2 connection(s) are held past the leak threshold right now: return those "
        "before growing the pool."
    )


def test_too_big_needs_thirty_intervals_a_limit_above_two_and_a_peak_of_half() -> None:
    assert advise(10, window(peak_used=5, kept_peak_used=5)) == Sizing(
        "too_big",
        "at most 5 of 10 connections were in use at once in the last 60 s, and nobody queued. "
        f"{LAW}. The rest only hold database server slots; a limit of 8 still leaves half again the peak.",
        8,
    )
    # One over half the limit: right.
    assert advise(10, window(peak_used=6, kept_peak_used=6)).verdict == "right"
    # A peak seen earlier in the kept history counts, and so does the window's own.
    assert advise(10, window(peak_used=2, kept_peak_used=6)).verdict == "right"
    assert advise(10, window(peak_used=6, kept_peak_used=2)).verdict == "right"
    assert advise(10, window(intervals=29, seconds=29.0)).verdict == "right"
    assert advise(10, window(intervals=30, seconds=30.0)).verdict == "too_big"
    # Anyone queued or timed out in the kept history: never too big.
    assert advise(10, window(kept_max_pending=1)).verdict == "right"
    assert advise(10, window(kept_timeouts=1)).verdict == "right"


def test_too_big_needs_a_limit_above_two() -> None:
    assert advise(2, window(peak_used=1, kept_peak_used=1)).verdict == "right"
    three = advise(3, window(peak_used=1, kept_peak_used=1, held_seconds=0.0, checkouts=1))
    assert (three.verdict, three.suggested_max) == ("too_big", 2)
    # 4 with a peak of 1: shrink to 2 (never below 2).
    assert advise(4, window(peak_used=1, kept_peak_used=1, held_seconds=0.0, checkouts=1)) == Sizing(
        "too_big",
        "at most 1 of 4 connections were in use at once in the last 60 s, and nobody queued. "
        "Little's law: 0.0 checkouts/s × 0.0 ms mean hold = 0.0 connections in use on average. "
        "The rest only hold database server slots; a limit of 2 still leaves half again the peak.",
        2,
    )


def test_shrinking_keeps_twice_the_mean_and_never_reaches_the_limit() -> None:
    # Peak 5 of 20, mean 4.5 in use: twice the mean (9) is more than half again the peak (8).
    assert advise(20, window(peak_used=5, kept_peak_used=5, held_seconds=270.0)).suggested_max == 9
    # Peak 5 of 10 with a mean of 4.6: the shrink would be 10 (not below the limit): right.
    assert advise(10, window(peak_used=5, kept_peak_used=5, held_seconds=276.0)).verdict == "right"


def test_the_kept_span_is_named_in_minutes_and_hours() -> None:
    hours = window(peak_used=1, kept_peak_used=1, kept_seconds=7200.0)
    assert "in the last 2.0 h, and nobody queued" in advise(10, hours).reason
    minutes = window(peak_used=1, kept_peak_used=1, kept_seconds=7199.0)
    assert "in the last 120.0 min, and nobody queued" in advise(10, minutes).reason
    two_minutes = window(peak_used=1, kept_peak_used=1, kept_seconds=120.0)
    assert "in the last 2.0 min, and nobody queued" in advise(10, two_minutes).reason
    seconds = window(peak_used=1, kept_peak_used=1, kept_seconds=30.0, seconds=119.0)
    assert "in the last 119 s, and nobody queued" in advise(10, seconds).reason


def test_right_says_why_and_calls_out_a_busy_pool_at_four_fifths() -> None:
    assert advise(3, window(peak_used=2)) == Sizing(
        "right", f"peak 2 of 3 in use, nobody queued or timed out in the last 60 s. {LAW}."
    )
    busy = advise(10, window(peak_used=10, kept_peak_used=10, held_seconds=480.0))  # 8.0 of 10
    assert busy.reason.endswith("On average 80% of the limit is in use: bursts will fill it.")
    calm = advise(10, window(peak_used=10, kept_peak_used=10, held_seconds=479.4))  # 7.99 of 10
    assert "bursts will fill it" not in calm.reason


@pytest.mark.parametrize(
    ("held_seconds", "checkouts", "law"),
    [
        (0.0, 0, "Little's law: 0.0 checkouts/s = 0.0 connections in use on average"),
        (90.0, 30, "Little's law: 0.5 checkouts/s × 3.00 s mean hold = 1.5 connections in use on average"),
    ],
)
def test_littles_law_reads_rate_times_hold_equals_mean(held_seconds: float, checkouts: int, law: str) -> None:
    sizing = advise(3, window(held_seconds=held_seconds, checkouts=checkouts, peak_used=2))
    assert sizing.reason == f"peak 2 of 3 in use, nobody queued or timed out in the last 60 s. {law}."


def test_a_window_of_no_length_reads_zero_not_a_division_error() -> None:
    empty = window(seconds=0.0)
    assert empty.mean_in_use == 0.0 and empty.checkout_rate == 0.0
    assert window(checkouts=0).mean_hold is None
    assert window(checkouts=4, held_seconds=2.0).mean_hold == 0.5


def test_growing_suggests_at_least_one_more_than_the_limit() -> None:
    # A timeout with a low peak in the window: the suggestion still grows the pool.
    sizing = advise(10, window(timeouts=1, peak_used=4, max_pending=0))
    assert (sizing.verdict, sizing.suggested_max) == ("too_small", 11)


def test_hours_are_rounded_to_a_tenth() -> None:
    assert (
        "in the last 2.4 h" in advise(10, window(peak_used=1, kept_peak_used=1, kept_seconds=8460.0)).reason
    )


def test_a_rows_mean_in_use_is_its_held_time_over_its_length() -> None:
    from poolwatch._record.intervals import Row
    from poolwatch._serve.history import mean_in_use_text

    def row(seconds: float, held: float) -> Row:
        return Row(1.0, seconds, 1, 0, 0, 0, 0, 0, 0, held, ())

    assert mean_in_use_text(row(1.0, 0.5)) == "0.50"
    assert mean_in_use_text(row(0.25, 0.5)) == "2.00"
    assert mean_in_use_text(row(0.0, 0.0)) == "0"  # an interval that has only just begun
