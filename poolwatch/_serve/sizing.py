"""Whether a pool looks too small, too big or right, from what the live page saw, and why.

Little's law gives the mean number of connections in use: checkouts per second times the mean hold
time, which is the same as connection-seconds held per second of the window. The peak in use, the
callers that queued, the wait p95 and the timeouts tell whether bursts fit. The verdict is a plain
sentence a person can act on; the numbers behind it go alongside in the JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Verdict = Literal["too_small", "too_big", "right", "unknown", "unbounded"]

# Less watched than this and there is nothing to say; "too big" wants a longer look, since a quiet
# half minute says little about the peak hour.
MIN_SECONDS = 10.0
MIN_SECONDS_TOO_BIG = 30.0
# A p95 wait above this on a full pool means callers queue for connections, not just connect.
QUEUEING_WAIT_SECONDS = 0.01
# Mean use above this share of the limit leaves no room for bursts.
BUSY_SHARE = 0.8


@dataclass(frozen=True, slots=True)
class Window:
    """What the page saw of one pool over its history window."""

    seconds: float
    checkouts: int
    timeouts: int
    wait_p95: float | None  # seconds; None without any checkout in the window
    checkout_rate: float  # returned checkouts per second (Little's lambda)
    mean_hold: float | None  # seconds per returned checkout (Little's W)
    mean_in_use: float  # lambda * W: connection-seconds held per second
    peak_used: int
    mean_used: float  # the mean of the sampled gauge, beside Little's
    max_pending: int


@dataclass(frozen=True, slots=True)
class Sizing:
    verdict: Verdict
    reason: str
    suggested_max: int | None = None


def advise(limit: int | None, window: Window, leaked_now: int = 0) -> Sizing:
    """The hint for a pool of at most ``limit`` connections (None: a pool without a limit)."""
    if limit is None:
        return Sizing("unbounded", "this pool class has no connection limit, so there is nothing to size")
    seconds = window.seconds
    if seconds < MIN_SECONDS or (window.checkouts == 0 and window.peak_used == 0):
        return Sizing(
            "unknown",
            f"watched for {seconds:.0f} s with {window.checkouts} checkouts; the hint needs at least "
            f"{MIN_SECONDS:.0f} s with traffic while this page is open",
        )
    law = _littles_law(window)
    leak_note = (
        f" But {leaked_now} connection(s) are held past the leak threshold right now: return those "
        "before growing the pool."
        if leaked_now
        else ""
    )
    span = _duration(seconds)
    demand = max(window.mean_in_use * 1.5, window.peak_used + window.max_pending)
    grow = max(limit + 1, math.ceil(demand))
    if window.timeouts:
        return Sizing(
            "too_small",
            f"{window.timeouts} checkout(s) timed out in the last {span}: callers waited pool_timeout for "
            f"one of the {limit} connections and gave up. {law}.{leak_note}",
            grow,
        )
    wait = window.wait_p95
    if window.peak_used >= limit and (
        window.max_pending > 0 or (wait is not None and wait >= QUEUEING_WAIT_SECONDS)
    ):
        return Sizing(
            "too_small",
            f"all {limit} connections were in use and callers queued (up to {window.max_pending} waiting, "
            f"wait p95 {_ms(wait)}) in the last {span}. {law}.{leak_note}",
            grow,
        )
    if window.mean_in_use >= BUSY_SHARE * limit:
        return Sizing(
            "too_small",
            f"{law}, {window.mean_in_use / limit:.0%} of the limit of {limit}: the next burst will "
            f"queue.{leak_note}",
            grow,
        )
    if (
        seconds >= MIN_SECONDS_TOO_BIG
        and limit > 2
        and window.peak_used * 2 <= limit
        and window.max_pending == 0
        and (wait is None or wait < QUEUEING_WAIT_SECONDS)
    ):
        shrink = max(2, math.ceil(max(window.peak_used * 1.5, window.mean_in_use * 2)))
        if shrink < limit:
            return Sizing(
                "too_big",
                f"at most {window.peak_used} of {limit} connections were in use in the last {span} and "
                f"nobody waited. {law}. The rest only hold database server slots; a limit of {shrink} "
                "still leaves half again the peak.",
                shrink,
            )
    return Sizing(
        "right",
        f"peak {window.peak_used} of {limit} in use, nobody timed out, wait p95 {_ms(wait)} in the last "
        f"{span}. {law}: room for bursts without idle connections to spare.{leak_note}",
    )


def _littles_law(window: Window) -> str:
    if window.mean_hold is None:
        return f"No checkout came back in the window; sampled mean in use {window.mean_used:.1f}"
    return (
        f"Little's law: {window.checkout_rate:.1f} checkouts/s × {_ms(window.mean_hold)} mean hold = "
        f"{window.mean_in_use:.1f} connections in use on average"
    )


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.1f} ms"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
