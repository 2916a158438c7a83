"""Two ways a checkout holds its connection longer than its work needs, measured per checkout.

Idle in a transaction: the part of held-idle time inside an open transaction. The capture side
keeps the open stretch in the checkout's usage list (``CheckoutEntry.usage``, see
``_capture.transactions``); the helpers here close and read it, for the statement timer, the
checkin and the live page alike.

Held after the response started: a checkout taken before its request's response started and
returned after (a dependency with ``yield`` whose session lives until a streamed body ends).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .context import RequestContext, response_kind
from .events import HeldDuringResponse, describe_site, emit

if TYPE_CHECKING:
    from .recorder import PoolRecorder

# Responses whose body can take as long as the application likes.
LONG_BODIES = frozenset(("sse", "streaming", "file"))
LIKELY_CAUSE = (
    "a dependency with yield (a database session) lives until the response body ends: the "
    "connection stays out for the whole stream. Load what the stream needs and close the session "
    "before returning the response, or open a session inside the generator for each chunk"
)


def close_stretch(usage: list[float], until: float) -> None:
    """End the open transaction's idle stretch, if one is open, at ``until``."""
    began = usage[3]
    if began:
        usage[3] = 0.0
        usage[2] += max(0.0, (until - began) - (usage[1] - usage[4]))


def idle_in_transaction(usage: list[float], now: float) -> float:
    """The checkout's idle-in-transaction seconds so far, an open stretch counted up to ``now``."""
    if len(usage) < 5:  # a usage list without the stretch (another capture side)
        return 0.0
    began = usage[3]
    if not began:
        return usage[2]
    return usage[2] + max(0.0, (now - began) - (usage[1] - usage[4]))


def returned_after_response(
    recorder: PoolRecorder, entry: tuple[Any, ...], request: RequestContext, route: str, now: float
) -> None:
    """A checkout taken before its response started came back after: observed, and reported once
    when a long body (stream, SSE, file) kept it out past the threshold."""
    after = now - request.response_started_at
    histogram = recorder.held_after_response.get(route) or recorder.held_after_response_for(route)
    histogram.observe(after)
    threshold = recorder.held_during_response_threshold
    if not 0 < threshold < after:
        return
    kind = response_kind(request)
    if kind not in LONG_BODIES:
        return
    site, function = describe_site(entry[3])
    event = HeldDuringResponse(
        recorder.name, route, request.method, kind, now - entry[0], after, threshold, site, function,
        LIKELY_CAUSE,
    )  # fmt: skip
    context = entry[6]
    if context is None:
        emit(event)
    else:
        context.copy().run(emit, event)
