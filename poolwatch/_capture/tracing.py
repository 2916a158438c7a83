"""The active OpenTelemetry trace, if any, for exemplars. OpenTelemetry stays an optional extra."""

from __future__ import annotations

import contextlib
import time
from typing import Any

_get_current_span: Any = None
with contextlib.suppress(ImportError):  # OpenTelemetry is the optional "otel" extra
    from opentelemetry.trace import get_current_span as _get_current_span


def current_trace_id() -> str | None:
    """The current span's trace id as 32 hex digits, or None outside a (valid) span."""
    if _get_current_span is None:
        return None
    context = _get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x")


def exemplar(value: float) -> tuple[str, float, float] | None:
    trace_id = current_trace_id()
    return None if trace_id is None else (trace_id, value, time.time())
