"""poolwatch's own families written straight to the text and OpenMetrics formats.

prometheus_client's encoders validate and escape every label of every sample and build a Sample
object per histogram bucket; at 3 pools x 50 routes that is ~4,500 samples and most of a scrape's
cost. Here each series' label block is escaped once and cached, each bucket layout's ``le`` strings
are formatted once, and a sample costs one f-string. The output parses to the same samples as
prometheus_client's (tests/test_exposition.py holds the two side by side).
"""

from __future__ import annotations

from collections.abc import Callable

from .._record.histogram import bound_labels
from .collector import SPECS, HistogramRow, Scrape

# (label names, label values) -> 'pool="a",route="/x"'. Label values are bounded sets (pool names,
# route templates, operations, error classes), but a cap keeps a pathological app from growing it.
_CACHE_LIMIT = 20_000
_label_blocks: dict[tuple[tuple[str, ...], tuple[str, ...]], str] = {}


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _label_block(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    key = (names, values)
    block = _label_blocks.get(key)
    if block is None:
        if len(_label_blocks) >= _CACHE_LIMIT:
            _label_blocks.clear()
        block = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
        _label_blocks[key] = block
    return block


def write(scrape: Scrape, *, openmetrics: bool) -> bytes:
    """The families of ``scrape`` in the text format, or in OpenMetrics without its ``# EOF``."""
    out: list[str] = []
    append = out.append
    for name, rows in scrape.rows.items():
        spec = SPECS[name]
        # OpenMetrics names a counter family without its _total; the text format with it.
        family = name[:-6] if openmetrics and spec.kind == "counter" else name
        append(f"# HELP {family} {spec.help}\n# TYPE {family} {spec.kind}\n")
        names = spec.labels
        for values, value in rows:
            labels = _label_block(names, values)
            if isinstance(value, HistogramRow):
                _write_histogram(append, name, labels, value, openmetrics)
            elif labels:
                append(f"{name}{{{labels}}} {float(value)!r}\n")
            else:
                append(f"{name} {float(value)!r}\n")
    return "".join(out).encode("utf-8")


def _write_histogram(
    add: Callable[[str], None], name: str, labels: str, row: HistogramRow, openmetrics: bool
) -> None:
    copy = row.copy
    bounds = bound_labels(copy.bounds)
    prefix = f"{name}_bucket{{{labels}," if labels else f"{name}_bucket{{"
    exemplar_at = -1
    exemplar_text = ""
    if openmetrics and row.exemplar is not None:
        trace_id, value, timestamp = row.exemplar
        # OpenMetrics: the exemplar sits on the first bucket its value falls into.
        exemplar_at = next((i for i, bound in enumerate(copy.bounds) if value <= bound), len(copy.bounds))
        exemplar_text = f' # {{trace_id="{_escape(trace_id)}"}} {value!r} {timestamp!r}'
    running = 0
    for index, (bound, count) in enumerate(zip(bounds, copy.counts, strict=True)):
        running += count
        tail = exemplar_text if index == exemplar_at else ""
        add(f'{prefix}le="{bound}"}} {running}.0{tail}\n')
    braces = f"{{{labels}}}" if labels else ""
    add(f"{name}_count{braces} {running}.0\n{name}_sum{braces} {copy.total!r}\n")
