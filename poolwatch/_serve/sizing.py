"""Whether a pool looks too small, too big or right, from the interval sampler's rows, and why.

Every number the verdict uses is exact, none sampled: the peak in use and the largest queue come
from a compare on every checkout and every queue entry (``PoolRecorder.take_peaks``), and the mean in
use is the connection-seconds held *inside* the window, checkouts still out included, divided by its
length (Little's L, measured rather than estimated as lambda times W). So a burst shorter than any
sample shows at its full height, and one long checkout counts only the part of it inside the window.

The rules, in order (the first that applies gives the verdict):

1. ``unbounded``: the pool class has no limit (NullPool, StaticPool, ...).
2. ``unknown``: fewer than ``MIN_INTERVALS`` complete intervals watched, or no connection taken in
   the window. The verdict says so rather than guess.
3. ``too_small``: a checkout timed out in the window.
4. ``too_small``: callers queued for a free slot in the window (the pool was full, exactly).
5. ``right`` otherwise, unless all of these hold, which makes it ``too_big``: at least
   ``MIN_INTERVALS_TOO_BIG`` intervals watched, a limit above 2, the peak in use over everything
   kept (up to 6 h, not only the window) at most half the limit, nobody queued and nothing timed out
   in all that time.

It never says ``too_small`` when nobody queued or timed out (then every caller got a connection at
once), however high the mean: a pool busy on average but never full has room, and more connections
would only sit idle. A suggested limit is never below the exact peak: growing suggests at least the
limit plus one and the peak plus the largest queue; shrinking suggests half again the longest peak
kept, and at least twice the mean in use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Verdict = Literal["too_small", "too_big", "right", "unknown", "unbounded"]

# Fewer complete intervals than this (10 s at the default 1 s) and there is nothing to say;
# "too big" wants a longer look (30 s here, and the whole kept history's peak besides).
MIN_INTERVALS = 10
MIN_INTERVALS_TOO_BIG = 30
# Mean use above this share of the limit is called out in a "right" verdict: bursts will fill it.
BUSY_SHARE = 0.8


@dataclass(frozen=True, slots=True)
class Window:
    """One pool over the verdict's window (the recent rows and the interval under way), and the
    extremes of everything kept for it."""

    seconds: float
    intervals: int  # complete sampler intervals in the window
    interval_seconds: float
    checkouts: int
    timeouts: int
    wait_p95: float | None  # seconds; None without any wait in the window
    held_seconds: float  # connection-seconds held inside the window, checkouts still out included
    peak_used: int  # exact
    max_pending: int  # exact: the most callers queued for a free slot at once
    mean_used: float  # the mean of the checkouts out at each interval's end, beside Little's
    # Everything kept (the long rows too): "too big" must hold for all of it.
    kept_seconds: float
    kept_peak_used: int
    kept_max_pending: int
    kept_timeouts: int

    @property
    def mean_in_use(self) -> float:
        """Little's L: connection-seconds held per second of the window."""
        return self.held_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def checkout_rate(self) -> float:
        """Little's lambda: checkouts per second."""
        return self.checkouts / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_hold(self) -> float | None:
        """Little's W = L / lambda: the mean time a checkout of the window held its connection
        inside it."""
        return self.held_seconds / self.checkouts if self.checkouts else None


@dataclass(frozen=True, slots=True)
class Sizing:
    verdict: Verdict
    reason: str
    suggested_max: int | None = None


def advise(limit: int | None, window: Window, leaked_now: int = 0) -> Sizing:
    """The hint for a pool of at most ``limit`` connections (None: a pool without a limit)."""
    if limit is None:
        return Sizing("unbounded", "this pool class has no connection limit, so there is nothing to size")
    if window.intervals < MIN_INTERVALS:
        return Sizing(
            "unknown",
            f"watched for {window.seconds:.0f} s; the hint needs at least "
            f"{MIN_INTERVALS * window.interval_seconds:.0f} s",
        )
    if window.peak_used == 0 and window.checkouts == 0 and window.max_pending == 0:
        return Sizing(
            "unknown", f"no connection was taken in the last {_duration(window.seconds)}: nothing to size yet"
        )
    law = _littles_law(window)
    leak_note = (
        f" But {leaked_now} connection(s) are held past the leak threshold right now: return those "
        "before growing the pool."
        if leaked_now
        else ""
    )
    span = _duration(window.seconds)
    peak = window.peak_used
    grow = max(limit + 1, peak + window.max_pending, math.ceil(window.mean_in_use * 1.5))
    if window.timeouts:
        return Sizing(
            "too_small",
            f"{window.timeouts} checkout(s) timed out in the last {span}: callers waited pool_timeout for "
            f"one of the {limit} connections and gave up. Peak {peak} of {limit} in use, up to "
            f"{window.max_pending} queued. {law}.{leak_note}",
            grow,
        )
    if window.max_pending > 0:
        return Sizing(
            "too_small",
            f"callers queued for a free connection in the last {span} (up to {window.max_pending} at "
            f"once, peak {peak} of {limit} in use, wait p95 {_ms(window.wait_p95)}). {law}.{leak_note}",
            grow,
        )
    kept_peak = max(window.kept_peak_used, peak)
    if (
        window.intervals >= MIN_INTERVALS_TOO_BIG
        and limit > 2
        and kept_peak * 2 <= limit
        and window.kept_max_pending == 0
        and window.kept_timeouts == 0
    ):
        shrink = max(2, kept_peak, math.ceil(kept_peak * 1.5), math.ceil(window.mean_in_use * 2))
        if shrink < limit:
            kept = _duration(max(window.kept_seconds, window.seconds))
            return Sizing(
                "too_big",
                f"at most {kept_peak} of {limit} connections were in use at once in the last {kept}, "
                f"and nobody queued. {law}. The rest only hold database server slots; a limit of "
                f"{shrink} still leaves half again the peak.",
                shrink,
            )
    busy = (
        f" On average {window.mean_in_use / limit:.0%} of the limit is in use: bursts will fill it."
        if window.mean_in_use >= BUSY_SHARE * limit
        else ""
    )
    return Sizing(
        "right",
        f"peak {peak} of {limit} in use, nobody queued or timed out in the last {span}. {law}.{busy}"
        f"{leak_note}",
    )


def _littles_law(window: Window) -> str:
    mean_hold = window.mean_hold
    hold = f" × {_ms(mean_hold)} mean hold" if mean_hold is not None else ""
    return (
        f"Little's law: {window.checkout_rate:.1f} checkouts/s{hold} = {window.mean_in_use:.1f} "
        "connections in use on average"
    )


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.1f} ms"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
