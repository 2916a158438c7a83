"""Leak detection: long-held checkouts flagged by the sweeper, with the code site that took them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import create_async_engine
from structlog.testing import capture_logs

import poolwatch
from poolwatch._record.events import shown_path
from tests import attribution_app
from tests.fault_fixtures import SERVINGS, Serving, client_of, wait_until_async
from tests.metrics import scrape
from tests.ports import free_port


def wait_for_event(events: list[dict], name: str, timeout: float) -> float | None:  # type: ignore[type-arg]
    """Poll captured events; the monotonic time ``name`` first appeared, or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(event["event"] == name for event in events):
            return time.monotonic()
        time.sleep(0.02)
    return None


def test_held_connection_is_flagged_once_with_its_borrow_site(
    sync_url: str, registry: CollectorRegistry
) -> None:
    engine = sa.create_engine(sync_url, pool_size=2)
    poolwatch.watch(engine, registry=registry, name="leaky", leak_threshold_seconds=1)
    with capture_logs() as events:
        taken_at = time.monotonic()
        connection = engine.connect(); borrow_line = _line()  # noqa: E702 - same line on purpose  # fmt: skip
        got_at = time.monotonic()
        # Flagged by the sweeper while the connection is still out, and never before the threshold.
        flagged_at = wait_for_event(events, "poolwatch.leak_detected", timeout=10)
        assert flagged_at is not None, "the held connection was never flagged while it was out"
        assert flagged_at - taken_at >= 1
        samples = scrape(registry)
        assert samples.value("poolwatch_leaked_connections", pool="leaky") == 1
        assert samples.value("poolwatch_oldest_checkout_age_seconds", pool="leaky") > 1
        assert samples.value("poolwatch_leaks_total", pool="leaky", route="<none>") == 1
        time.sleep(0.5)  # held on past its flagging: still one leak, returned once
        closing_at = time.monotonic()
        connection.close()
        closed_at = time.monotonic()
    detected = [e for e in events if e["event"] == "poolwatch.leak_detected"]
    returned = [e for e in events if e["event"] == "poolwatch.leak_returned"]
    assert len(detected) == 1 and len(returned) == 1, events
    assert detected[0]["site"] == f"{shown_path(__file__)}:{borrow_line}"
    assert detected[0]["function"] == "test_held_connection_is_flagged_once_with_its_borrow_site"
    assert detected[0]["pool"] == "leaky" and detected[0]["route"] == "<none>"
    assert detected[0]["log_level"] == "warning"
    assert "stack" not in detected[0]
    # Timed from the end of the checkout to the checkin (rounded to the millisecond).
    assert closing_at - got_at - 0.0005 <= returned[0]["seconds_held"] <= closed_at - taken_at + 0.0005
    samples = scrape(registry)
    assert samples.value("poolwatch_leaked_connections", pool="leaky") == 0
    assert samples.value("poolwatch_oldest_checkout_age_seconds", pool="leaky") == 0
    assert samples.value("poolwatch_leaks_total", pool="leaky", route="<none>") == 1
    engine.dispose()


def _line() -> int:
    import sys

    return sys._getframe(1).f_lineno


def test_short_hold_is_no_leak(sync_url: str, registry: CollectorRegistry) -> None:
    threshold = 1.5
    engine = sa.create_engine(sync_url, pool_size=2)
    watch = poolwatch.watch(engine, registry=registry, name="brief", leak_threshold_seconds=threshold)
    with capture_logs() as events:
        taken_at = time.monotonic()
        with engine.connect():
            time.sleep(0.1)  # far below the threshold
        # Past the threshold since the checkout: had the returned checkout stayed in the table, the
        # gauge would count it now and a sweep (run here, not left to the sweeper's timing) flag it.
        time.sleep(max(0.0, taken_at + threshold + 0.1 - time.monotonic()))
        watch.recorders[0].sweep()
        samples = scrape(registry)
    assert [e for e in events if e["event"].startswith("poolwatch.leak")] == []
    assert samples.value("poolwatch_leaks_total", pool="brief", route="<none>") == 0
    assert samples.value("poolwatch_leaked_connections", pool="brief") == 0
    assert samples.value("poolwatch_oldest_checkout_age_seconds", pool="brief") == 0
    engine.dispose()


def test_full_stack_is_kept_when_asked(sync_url: str, registry: CollectorRegistry) -> None:
    engine = sa.create_engine(sync_url, pool_size=2)
    poolwatch.watch(
        engine, registry=registry, name="stacked", leak_threshold_seconds=0.3, leak_capture_stack=True
    )
    with capture_logs() as events, engine.connect():
        assert wait_for_event(events, "poolwatch.leak_detected", timeout=10) is not None
    [event] = [e for e in events if e["event"] == "poolwatch.leak_detected"]
    assert "test_full_stack_is_kept_when_asked" in event["stack"]
    assert "sqlalchemy" in event["stack"]  # the whole stack, not only the borrow site
    engine.dispose()


def test_leak_detection_off_captures_nothing(sync_url: str, registry: CollectorRegistry) -> None:
    engine = sa.create_engine(sync_url, pool_size=2)
    watch = poolwatch.watch(engine, registry=registry, name="off", leak_threshold_seconds=0)
    [recorder] = watch.recorders
    with capture_logs() as events, engine.connect():
        time.sleep(0.4)
        assert all(entry[3] is None for entry in recorder.open_checkouts.values())
        # Scraped while the connection is still held, 0.4 s in: a threshold of 0 read as "every
        # checkout is a leak" would show it here (after the checkin nothing could be leaked).
        held = scrape(registry)
        assert held.value("poolwatch_connections", pool="off", state="used") == 1
        assert held.value("poolwatch_oldest_checkout_age_seconds", pool="off") >= 0.4
        assert held.value("poolwatch_leaked_connections", pool="off") == 0
        assert held.value("poolwatch_leaks_total", pool="off", route="<none>") == 0
    assert [e for e in events if e["event"].startswith("poolwatch.leak")] == []
    engine.dispose()


@pytest.mark.parametrize("serving", SERVINGS)
async def test_async_leak_in_a_request_names_the_endpoint(
    async_url: str, sync_url: str, registry: CollectorRegistry, serving: Serving
) -> None:
    async_engine = create_async_engine(async_url, pool_size=2)
    sync_engine = sa.create_engine(sync_url, pool_size=1)
    app, watch = attribution_app.build_app(async_engine, sync_engine, registry, leak_threshold_seconds=0.5)
    with capture_logs() as events:
        async with client_of(app, serving) as client:
            assert (await client.get("/hold/1.2")).status_code == 200
            # Under a server the connection comes back after the response: its events with it.
            await wait_until_async(
                lambda: scrape(registry).value("poolwatch_connections", pool="async", state="used") == 0,
                10,
                "the endpoint's connection never came back",
            )
    detected = [e for e in events if e["event"] == "poolwatch.leak_detected"]
    assert len(detected) == 1, events
    assert detected[0]["route"] == "/hold/{seconds}"
    # Across SQLAlchemy's greenlet: the endpoint's own await, not SQLAlchemy's internals.
    assert detected[0]["site"].startswith(shown_path(attribution_app.__file__) + ":")
    assert detected[0]["function"].endswith("hold")
    assert scrape(registry).value("poolwatch_leaks_total", pool="async", route="/hold/{seconds}") == 1
    watch.close()
    await async_engine.dispose()
    sync_engine.dispose()


@pytest.fixture
def served_app(async_url: str, sync_url: str, registry: CollectorRegistry) -> Iterator[str]:
    """The attribution app under a real uvicorn, in a thread; yields its base URL."""
    async_engine = create_async_engine(async_url, pool_size=2)
    sync_engine = sa.create_engine(sync_url, pool_size=1)
    app, watch = attribution_app.build_app(async_engine, sync_engine, registry)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    watch.close()
    asyncio.run(async_engine.dispose())
    sync_engine.dispose()


def test_client_disconnect_mid_request_returns_the_connection(
    served_app: str, registry: CollectorRegistry
) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{served_app}/hold/1.0", timeout=0.3)
    # The endpoint finishes (uvicorn does not cancel it) or is cancelled; either way it returns.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if scrape(registry).value("poolwatch_connections", pool="async", state="used") == 0:
            break
        time.sleep(0.05)
    samples = scrape(registry)
    assert samples.value("poolwatch_connections", pool="async", state="used") == 0
    assert (
        samples.value("poolwatch_use_seconds_count", pool="async", route="/hold/{seconds}", method="GET") == 1
    )
    assert sum(value for _, value in samples.find("poolwatch_leaks_total")) == 0
    assert sum(value for _, value in samples.find("poolwatch_gc_reclaimed_total")) == 0


def test_checkout_from_the_root_of_a_greenlet_is_still_counted(
    sync_url: str, registry: CollectorRegistry
) -> None:
    """pool.connect as a greenlet's first frame has no caller: the borrow site is unknown, no more."""
    import greenlet

    engine = sa.create_engine(sync_url, pool_size=1)
    watch = poolwatch.watch(engine, registry=registry, name="root", leak_threshold_seconds=5)
    errors_before = scrape(registry).value("poolwatch_internal_errors_total")
    fairy = greenlet.greenlet(engine.pool.connect).switch()
    samples = scrape(registry)
    assert samples.value("poolwatch_checkouts_total", pool="root") == 1
    assert samples.value("poolwatch_pending_requests", pool="root") == 0
    assert samples.value("poolwatch_internal_errors_total") == errors_before
    [entry] = watch.recorders[0].open_checkouts.values()
    assert entry[3] is None  # no application frame to name
    fairy.close()
    assert scrape(registry).value("poolwatch_checkins_total", pool="root") == 1
    engine.dispose()
