"""What users see, pinned: the exported names and their signatures, the settings, the metric catalogue.

A change to any of these is a change to the contract (DESIGN.md, the dashboards, the alerts, the
README); this file makes it deliberate. Moving code between private modules must leave it alone.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import poolwatch
from poolwatch import PoolWatch, PoolWatchMiddleware, PoolWatchSettings

EXPORTS = [
    "PoolGuard",
    "PoolWatch",
    "PoolWatchMiddleware",
    "PoolWatchSettings",
    "assert_max_queries",
    "assert_queries",
    "instrument",
    "otel_bridge",
    "watch",
]

SETTINGS = {
    "leak_threshold_seconds": 30.0,
    "leak_capture_stack": False,
    "slow_query_seconds": 1.0,
    "held_idle_seconds": 5.0,
    "idle_in_transaction_seconds": 5.0,
    "held_during_response_seconds": 5.0,
    "metrics_path": "/metrics",
    "health_db_path": "/health/db",
    "health_live_path": "/health/live",
    "health_deadline_seconds": 0.5,
    "health_cache_seconds": 2.0,
    "health_details": "never",
    "health_token": None,
    "health_saturated_status": 200,
    "health_stall_seconds": 10.0,
    "timeout_note": True,
    "metrics_port": None,
    "metrics_host": "0.0.0.0",
    "tracing": False,
    "multiproc_dir": None,
    "multiproc_interval_seconds": 1.0,
    "ui": "never",
    "ui_path": "/poolwatch",
    "ui_token": None,
    "server_connections_max": None,
}

EVENT_NAMES = [
    "poolwatch.gc_reclaimed",
    "poolwatch.health_changed",
    "poolwatch.held_during_response",
    "poolwatch.held_idle",
    "poolwatch.idle_in_transaction",
    "poolwatch.internal_error",
    "poolwatch.leak_detected",
    "poolwatch.leak_returned",
    "poolwatch.multiworker_without_directory",
    "poolwatch.otel_bridge",
    "poolwatch.path_taken",
    "poolwatch.pool_name_reused",
    "poolwatch.pool_timeout",
    "poolwatch.pre_ping_failed",
    "poolwatch.server_limit_not_claimed",
    "poolwatch.slow_query",
    "poolwatch.threadpool_starvation",
    "poolwatch.unknown_setting",
]

CATALOGUE = [
    ("poolwatch_connections", "gauge", ("pool", "state")),
    ("poolwatch_connections_max", "gauge", ("pool",)),
    ("poolwatch_connections_overflow", "gauge", ("pool",)),
    ("poolwatch_pending_requests", "gauge", ("pool",)),
    ("poolwatch_connections_opening", "gauge", ("pool",)),
    ("poolwatch_connections_pinging", "gauge", ("pool",)),
    ("poolwatch_oldest_checkout_age_seconds", "gauge", ("pool",)),
    ("poolwatch_leaked_connections", "gauge", ("pool",)),
    ("poolwatch_pool_info", "gauge", ("pool", "dialect", "driver", "pool_class", "server", "role")),
    ("poolwatch_server_connections_max", "gauge", ("pool",)),
    ("poolwatch_threadpool_threads", "gauge", ("state",)),
    ("poolwatch_threadpool_capacity", "gauge", ()),
    ("poolwatch_checkouts_total", "counter", ("pool",)),
    ("poolwatch_checkins_total", "counter", ("pool",)),
    ("poolwatch_connects_total", "counter", ("pool",)),
    ("poolwatch_disconnects_total", "counter", ("pool", "reason")),
    ("poolwatch_checkouts_queued_total", "counter", ("pool",)),
    ("poolwatch_waits_cancelled_total", "counter", ("pool", "route")),
    ("poolwatch_timeouts_total", "counter", ("pool", "route")),
    ("poolwatch_connect_errors_total", "counter", ("pool", "error")),
    ("poolwatch_pre_ping_failures_total", "counter", ("pool",)),
    ("poolwatch_invalidations_total", "counter", ("pool", "reason")),
    ("poolwatch_leaks_total", "counter", ("pool", "route")),
    ("poolwatch_gc_reclaimed_total", "counter", ("pool", "route")),
    ("poolwatch_checkouts_after_response_total", "counter", ("pool", "route")),
    ("poolwatch_query_errors_total", "counter", ("pool", "operation", "error")),
    ("poolwatch_internal_errors_total", "counter", ()),
    ("poolwatch_wait_seconds", "histogram", ("pool",)),
    ("poolwatch_use_seconds", "histogram", ("pool", "route", "method")),
    ("poolwatch_connect_seconds", "histogram", ("pool",)),
    ("poolwatch_query_seconds", "histogram", ("pool", "operation")),
    ("poolwatch_request_queries", "histogram", ("route", "method")),
    ("poolwatch_held_idle_seconds", "histogram", ("pool", "route")),
    ("poolwatch_idle_in_transaction_seconds", "histogram", ("pool", "route")),
    ("poolwatch_held_after_response_seconds", "histogram", ("pool", "route")),
]


def test_all_is_pinned_and_every_name_resolves() -> None:
    assert poolwatch.__all__ == EXPORTS
    for name in poolwatch.__all__:
        assert getattr(poolwatch, name) is not None
    namespace: dict[str, object] = {}
    exec("from poolwatch import *", namespace)
    assert sorted(name for name in namespace if not name.startswith("__")) == sorted(EXPORTS)


def _parameters(function: object) -> list[tuple[str, str, object]]:
    """(name, kind, default) per parameter: what a caller can pass, not how it is annotated."""
    signature = inspect.signature(function)  # type: ignore[arg-type]
    return [(p.name, p.kind.name, p.default) for p in signature.parameters.values()]


EMPTY = inspect.Parameter.empty


def test_public_signatures_are_pinned() -> None:
    common = [
        ("registry", "KEYWORD_ONLY", None),
        ("name", "KEYWORD_ONLY", None),
        ("settings", "VAR_KEYWORD", EMPTY),
    ]
    assert _parameters(poolwatch.instrument) == [
        ("app", "POSITIONAL_OR_KEYWORD", EMPTY),
        ("engines", "VAR_POSITIONAL", EMPTY),
        *common,
    ]
    assert _parameters(poolwatch.watch) == [("engines", "VAR_POSITIONAL", EMPTY), *common]
    assert _parameters(PoolWatch) == [("engines", "POSITIONAL_OR_KEYWORD", ()), *common]
    assert _parameters(PoolWatchMiddleware) == [
        ("app", "POSITIONAL_OR_KEYWORD", EMPTY),
        ("engines", "POSITIONAL_OR_KEYWORD", None),
        ("watch", "KEYWORD_ONLY", None),
        *common,
    ]
    assert _parameters(poolwatch.otel_bridge) == [
        ("watch", "POSITIONAL_OR_KEYWORD", EMPTY),
        ("meter_provider", "POSITIONAL_OR_KEYWORD", None),
    ]
    assert _parameters(PoolWatch.add) == [
        ("self", "POSITIONAL_OR_KEYWORD", EMPTY),
        ("engines", "VAR_POSITIONAL", EMPTY),
        ("name", "KEYWORD_ONLY", None),
    ]
    assert _parameters(PoolWatch.remove) == [
        ("self", "POSITIONAL_OR_KEYWORD", EMPTY),
        ("engines", "VAR_POSITIONAL", EMPTY),
    ]
    assert _parameters(PoolWatch.close) == [("self", "POSITIONAL_OR_KEYWORD", EMPTY)]
    for attribute in ("recorders", "requests", "pool_names", "direct_collector"):
        assert isinstance(inspect.getattr_static(PoolWatch, attribute), property), attribute
    # The test guards (the pytest plugin's fixture is a PoolGuard).
    budget = [("limit", "POSITIONAL_OR_KEYWORD", EMPTY), ("engines", "VAR_POSITIONAL", EMPTY)]
    assert _parameters(poolwatch.assert_max_queries) == budget
    assert _parameters(poolwatch.assert_queries) == [("count", "POSITIONAL_OR_KEYWORD", EMPTY), budget[1]]
    assert _parameters(poolwatch.PoolGuard) == []
    assert _parameters(poolwatch.PoolGuard.only) == [
        ("self", "POSITIONAL_OR_KEYWORD", EMPTY),
        ("engines", "VAR_POSITIONAL", EMPTY),
    ]
    for method in ("leaks", "check", "start", "stop"):
        assert _parameters(getattr(poolwatch.PoolGuard, method)) == [("self", "POSITIONAL_OR_KEYWORD", EMPTY)]
    assert isinstance(inspect.getattr_static(poolwatch.PoolGuard, "engines"), property)


def test_settings_and_their_defaults_are_pinned() -> None:
    fields = PoolWatchSettings.model_fields
    assert {name: field.default for name, field in fields.items()} == SETTINGS


def test_the_typed_keywords_name_every_setting() -> None:
    from poolwatch._settings import SettingsKeywords

    assert list(SettingsKeywords.__annotations__) == list(SETTINGS)


def test_the_metric_catalogue_is_pinned() -> None:
    from poolwatch._serve.collector import SPECS

    assert [(spec.name, spec.kind, spec.labels) for spec in SPECS.values()] == CATALOGUE


def _logged_notices() -> set[str]:
    """Event names passed to ``logger.<level>(...)`` anywhere in the package (configuration
    notices and internal errors; pool facts are typed events)."""
    names = set()
    for path in Path(poolwatch.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "logger"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                names.add(node.args[0].value)
    return names


def test_event_names_are_pinned() -> None:
    from poolwatch._record.events import EVENT_TYPES

    typed = {kind.name for kind in EVENT_TYPES}
    notices = _logged_notices()
    assert not typed & notices, "a pool fact is both a typed event and a direct log call"
    assert sorted(typed | notices) == EVENT_NAMES
