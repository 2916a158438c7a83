"""Events reach the application's logging: stdlib ``logging`` unless structlog is configured.

Real events from a real pool on PostgreSQL (a slow query, a checkout timeout, a leak flagged by the
sweeper thread and its return), caught by a real handler on the ``poolwatch`` logger and formatted
by a real ``logging.Formatter``.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

import poolwatch
from poolwatch._log import internal_errors, logger

FORMAT = "%(levelname)s %(name)s %(message)s"


class Collected(logging.Handler):
    """Keeps each record with its formatted text, as a file or console handler would write it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter(FORMAT))
        self.records: list[tuple[logging.LogRecord, str]] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        with self.changed:
            self.records.append((record, text))
            self.changed.notify_all()

    def named(self, event: str) -> list[tuple[logging.LogRecord, str]]:
        return [(record, text) for record, text in self.records if getattr(record, "event", None) == event]

    def wait_for(self, event: str, timeout: float) -> tuple[logging.LogRecord, str]:
        with self.changed:
            self.changed.wait_for(lambda: self.named(event), timeout)
        found = self.named(event)
        assert found, f"no {event} record within {timeout} s: {[t for _, t in self.records]}"
        return found[0]


@pytest.fixture
def structlog_unconfigured() -> Iterator[None]:
    """structlog as in an application that never configured it (other tests' capture_logs did)."""
    saved = structlog.get_config()
    was_configured = structlog.is_configured()
    structlog.reset_defaults()
    assert not structlog.is_configured()
    yield
    if was_configured:
        structlog.configure(**saved)
    else:
        structlog.reset_defaults()


@pytest.fixture
def handler(structlog_unconfigured: None) -> Iterator[Collected]:
    collected = Collected()
    poolwatch_logger = logging.getLogger("poolwatch")
    level = poolwatch_logger.level
    poolwatch_logger.addHandler(collected)
    poolwatch_logger.setLevel(logging.INFO)
    yield collected
    poolwatch_logger.removeHandler(collected)
    poolwatch_logger.setLevel(level)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = record.poolwatch  # type: ignore[attr-defined]
    assert isinstance(fields, dict)
    return fields


def test_slow_query_and_timeout_reach_stdlib_logging_as_structured_warnings(
    sync_url: str, registry: CollectorRegistry, handler: Collected
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    poolwatch.watch(engine, registry=registry, name="stdlib", slow_query_seconds=0.05)
    with engine.connect() as connection:
        connection.exec_driver_sql("SELECT pg_sleep(0.2), 'a secret literal'")
        with pytest.raises(sa.exc.TimeoutError):
            engine.connect()
    engine.dispose()

    record, text = handler.wait_for("poolwatch.slow_query", timeout=10)
    assert record.name == "poolwatch" and record.levelno == logging.WARNING
    fields = _fields(record)
    assert fields["pool"] == "stdlib" and fields["operation"] == "SELECT"
    assert fields["seconds"] >= 0.2 and fields["threshold_seconds"] == 0.05
    assert fields["fingerprint"] == "SELECT pg_sleep(?), ?"
    # Readable as key=value, quoted where the value has spaces; the literal never appears.
    assert text.startswith(
        "WARNING poolwatch poolwatch.slow_query pool=stdlib route=<none> operation=SELECT "
    )
    assert 'fingerprint="SELECT pg_sleep(?), ?"' in text
    assert "secret" not in text
    # One template per event (the values are arguments), so error trackers group by event.
    assert record.msg.startswith("poolwatch.slow_query pool=%s route=%s")
    assert record.funcName == "_log_slow_query"  # where poolwatch logged it, not the sink

    record, text = handler.wait_for("poolwatch.pool_timeout", timeout=10)
    assert record.levelno == logging.WARNING
    fields = _fields(record)
    assert fields["pool"] == "stdlib" and fields["seconds_waited"] >= 0.2
    assert fields["pool_size"] == 1 and fields["checked_out"] == 1 and fields["callers_waiting"] == 1
    assert "pool=stdlib" in text and "pool_size=1" in text and "callers_waiting=1" in text


def test_leak_warning_from_the_sweeper_thread_and_its_return_at_info(
    sync_url: str, registry: CollectorRegistry, handler: Collected
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1)
    poolwatch.watch(engine, registry=registry, name="leaky", leak_threshold_seconds=0.3)
    connection = engine.connect()
    try:
        record, text = handler.wait_for("poolwatch.leak_detected", timeout=10)
        assert record.levelno == logging.WARNING and record.threadName == "poolwatch-leak-sweeper"
        fields = _fields(record)
        assert fields["pool"] == "leaky" and fields["seconds_held"] >= 0.3
        assert fields["function"] == "test_leak_warning_from_the_sweeper_thread_and_its_return_at_info"
        assert f"site={fields['site']}" in text
    finally:
        connection.close()
    record, text = handler.wait_for("poolwatch.leak_returned", timeout=10)
    assert record.levelno == logging.INFO
    assert _fields(record)["pool"] == "leaky" and "pool=leaky" in text
    engine.dispose()


def test_internal_errors_are_logged_at_error_with_the_exception(handler: Collected) -> None:
    site = f"test-site-{uuid.uuid4().hex[:8]}"  # each site is logged once per process
    try:
        raise RuntimeError("boom")
    except RuntimeError as error:
        internal_errors.record(site, error)
    record, text = handler.wait_for("poolwatch.internal_error", timeout=10)
    assert record.levelno == logging.ERROR
    assert _fields(record) == {"site": site, "error": "RuntimeError"}
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    assert f"site={site} error=RuntimeError" in text and "RuntimeError: boom" in text  # the traceback


def test_levels_below_the_loggers_are_not_emitted(handler: Collected) -> None:
    logging.getLogger("poolwatch").setLevel(logging.ERROR)
    site = f"test-site-{uuid.uuid4().hex[:8]}"
    internal_errors.record(site, RuntimeError("kept"))
    logger.warning("poolwatch.test_dropped", pool="x")
    assert [getattr(r, "event", None) for r, _ in handler.records] == ["poolwatch.internal_error"]


def test_configured_structlog_gets_the_events_unchanged_and_logging_none(
    sync_url: str, registry: CollectorRegistry, handler: Collected
) -> None:
    engine = sa.create_engine(sync_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    poolwatch.watch(engine, registry=registry, name="structured", slow_query_seconds=0.05)
    # Configured after poolwatch was imported and the engine watched: decided per event.
    with capture_logs() as events, engine.connect() as connection:
        connection.exec_driver_sql("SELECT pg_sleep(0.2)")
        with pytest.raises(sa.exc.TimeoutError):
            engine.connect()
    engine.dispose()
    [slow] = [e for e in events if e["event"] == "poolwatch.slow_query"]
    assert slow == {
        "event": "poolwatch.slow_query",
        "log_level": "warning",
        "pool": "structured",
        "route": "<none>",
        "operation": "SELECT",
        "seconds": slow["seconds"],
        "threshold_seconds": 0.05,
        "fingerprint": "SELECT pg_sleep(?)",
    }
    [timeout] = [e for e in events if e["event"] == "poolwatch.pool_timeout"]
    assert timeout["pool"] == "structured" and timeout["log_level"] == "warning"
    assert handler.records == [], [text for _, text in handler.records]


def test_back_to_logging_once_structlog_is_reset(handler: Collected) -> None:
    with capture_logs() as events:
        logger.info("poolwatch.test_event", pool="a")
    assert events == [{"event": "poolwatch.test_event", "log_level": "info", "pool": "a"}]
    assert handler.records == []
    structlog.reset_defaults()
    logger.info("poolwatch.test_event", pool="b")
    [(record, text)] = handler.records
    assert _fields(record) == {"pool": "b"} and text == "INFO poolwatch poolwatch.test_event pool=b"


def test_an_event_without_fields_and_values_that_need_quoting(handler: Collected) -> None:
    logger.warning("poolwatch.test_bare")
    logger.warning("poolwatch.test_quoted", empty="", spaced="a b", percent="100%s", line="x\ny")
    texts = [text for _, text in handler.records]
    assert texts[0] == "WARNING poolwatch poolwatch.test_bare"
    assert texts[1] == (
        'WARNING poolwatch poolwatch.test_quoted empty="" spaced="a b" percent=100%s line="x\\ny"'
    )


def test_no_handler_configured_warnings_still_reach_stderr(
    structlog_unconfigured: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """An app that configured nothing still sees warnings, through logging's last-resort handler."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()  # pytest's own capture handlers; an unconfigured app has none
    try:
        logger.warning("poolwatch.test_unconfigured", pool="p")
        logger.info("poolwatch.test_unconfigured_info", pool="p")
    finally:
        root.handlers[:] = saved
    err = capsys.readouterr().err
    assert "poolwatch.test_unconfigured pool=p" in err
    assert "test_unconfigured_info" not in err
