"""poolwatch's own families written straight to the text and OpenMetrics formats.

prometheus_client's encoders validate and escape every label of every sample and build a Sample
object per histogram bucket; at 3 pools x 50 routes that is ~7,700 samples and most of a scrape's
cost. Here each series' label block is escaped once and cached, and each histogram series has a
cached bytes template of all its lines, so writing one costs a single ``%`` with its counts. The
output parses to the same samples as prometheus_client's (tests/test_exposition.py holds the two
side by side).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate

from .._record.histogram import HistogramCopy, bound_labels
from .._record.recorder import Exemplar
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


def write(scrape: Scrape, *, openmetrics: bool) -> list[bytes]:
    """The families of ``scrape`` in the text format, or in OpenMetrics without its ``# EOF``, as
    chunks: the caller joins them once with whatever goes around them (a body is ~1 MB)."""
    out: list[bytes] = []
    append = out.append
    for name, rows in scrape.rows.items():
        spec = SPECS[name]
        # OpenMetrics names a counter family without its _total; the text format with it.
        family = name[:-6] if openmetrics and spec.kind == "counter" else name
        append(f"# HELP {family} {spec.help}\n# TYPE {family} {spec.kind}\n".encode())
        names = spec.labels
        for values, value in rows:
            labels = _label_block(names, values)
            if isinstance(value, HistogramRow):
                _write_histogram(append, name, labels, value, openmetrics)
            elif labels:
                append(f"{name}{{{labels}}} {float(value)!r}\n".encode())
            else:
                append(f"{name} {float(value)!r}\n".encode())
    return out


def _write_histogram(
    add: Callable[[bytes], None], name: str, labels: str, row: HistogramRow, openmetrics: bool
) -> None:
    copy = row.copy
    if openmetrics and row.exemplar is not None:
        add(_histogram_with_exemplar(name, labels, copy, row.exemplar).encode())
        return
    # Keyed without the bounds (hashing 18 floats per series would cost more than the lookup
    # saves); a series always keeps its layout, which is checked by identity.
    found = _templates.get((name, labels))
    if found is not None and found[0] is copy.bounds:
        template = found[1]
    else:
        template = _histogram_template(name, labels, copy.bounds)
    # One C-level formatting call per series (bytes formatting is about twice as fast as str's
    # here): the cumulative counts, the count again, the sum.
    cumulative: list[float] = list(accumulate(copy.counts))
    cumulative.append(cumulative[-1])
    cumulative.append(copy.total)
    add(template % tuple(cumulative))


# (family, label block) -> (bucket layout, the series' lines with a %d per count and %a, the repr
# of a float, for the sum). About 2 KiB each: 3 pools x 50 routes is ~400 series; the cap keeps
# a pathological series count under ~10 MiB (past it the cache starts over, costing only speed).
_TEMPLATE_LIMIT = 4_096
_templates: dict[tuple[str, str], tuple[tuple[float, ...], bytes]] = {}


def _histogram_template(name: str, labels: str, bounds: tuple[float, ...]) -> bytes:
    if len(_templates) >= _TEMPLATE_LIMIT:
        _templates.clear()
    # % is the only character %-formatting reads in the text.
    prefix, braces = _series_parts(name, labels.replace("%", "%%"))
    lines = [f'{prefix}le="{bound}"}} %d.0\n' for bound in bound_labels(bounds)]
    lines.append(f"{name}_count{braces} %d.0\n{name}_sum{braces} %a\n")
    template = "".join(lines).encode()
    _templates[(name, labels)] = (bounds, template)
    return template


def _series_parts(name: str, labels: str) -> tuple[str, str]:
    """A histogram series' bucket-line prefix (up to its ``le``) and its label braces."""
    if not labels:
        return f"{name}_bucket{{", ""
    return f"{name}_bucket{{{labels},", f"{{{labels}}}"


def _histogram_with_exemplar(name: str, labels: str, copy: HistogramCopy, exemplar: Exemplar) -> str:
    bounds = bound_labels(copy.bounds)
    prefix, braces = _series_parts(name, labels)
    trace_id, value, timestamp = exemplar
    # OpenMetrics: the exemplar sits on the first bucket its value falls into.
    exemplar_at = next((i for i, bound in enumerate(copy.bounds) if value <= bound), len(copy.bounds))
    exemplar_text = f' # {{trace_id="{_escape(trace_id)}"}} {value!r} {timestamp!r}'
    lines: list[str] = []
    running = 0
    for index, (bound, count) in enumerate(zip(bounds, copy.counts, strict=True)):
        running += count
        tail = exemplar_text if index == exemplar_at else ""
        lines.append(f'{prefix}le="{bound}"}} {running}.0{tail}\n')
    lines.append(f"{name}_count{braces} {running}.0\n{name}_sum{braces} {copy.total!r}\n")
    return "".join(lines)
