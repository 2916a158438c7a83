"""Cost of the slow-query fingerprint and memory of the operation cache, before and after issue 11.

The fingerprint runs inline (on the event loop for async engines) for every slow statement, so its
cost for the largest statement an application can send is what matters. "before" is the sqlparse
fingerprint poolwatch used until then, copied below; it needs ``sqlparse`` installed.

    python benchmarks/fingerprint.py               # everything (the old code takes ~30 s on 10 MB)
    python benchmarks/fingerprint.py --no-old-10mb # skip the old code's 10 MB runs
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable

from _common import print_header, table

from poolwatch._capture import sql as _sql

MIB = 1024 * 1024


# --- Before: poolwatch's fingerprint and operation cache until issue 11, verbatim -----------------

_OLD_MAX_FINGERPRINT = 2000
_OLD_WHITESPACE = re.compile(r"\s+")
_OLD_QUOTED_OR_NUMBER = re.compile(r"'(?:[^']|'')*'|\$\$.*?\$\$|\b\d+(?:\.\d+)?\b", re.DOTALL)


def old_fingerprint(statement: str) -> str:
    import sqlparse
    from sqlparse import tokens as T

    try:
        parts = []
        for token in sqlparse.parse(statement)[0].flatten():
            ttype = token.ttype
            if ttype in T.Comment:
                continue
            if ttype in T.Literal.String.Single or ttype in T.Literal.Number or ttype is T.Literal:
                parts.append("?")
            else:
                parts.append(token.value)
        text = "".join(parts)
    except Exception:
        text = _OLD_QUOTED_OR_NUMBER.sub("?", statement)
    text = _OLD_WHITESPACE.sub(" ", text).strip()
    return text if len(text) <= _OLD_MAX_FINGERPRINT else text[:_OLD_MAX_FINGERPRINT] + "…"


_OLD_CACHE_LIMIT = 4096
old_operation_cache: dict[str, str] = {}


def old_operation_of(statement: str) -> str:
    operation = old_operation_cache.get(statement)
    if operation is None:
        operation = _sql._classify(statement)  # the label itself is not what is compared here
        if len(old_operation_cache) >= _OLD_CACHE_LIMIT:
            old_operation_cache.clear()
        old_operation_cache[statement] = operation
    return operation


# --- Statements -----------------------------------------------------------------------------------


def statements() -> dict[str, str]:
    ten_mb_list = "SELECT a FROM t WHERE id IN (" + "1234567, " * (10 * MIB // 9) + "1)"
    return {
        "short ORM select": (
            "SELECT users.id, users.name, users.email \nFROM users \n"
            "WHERE users.id = %(id_1)s AND users.name LIKE %(name_1)s LIMIT %(param_1)s"
        ),
        "15,000 parameters (asyncpg)": (
            "SELECT t.id, t.name \nFROM t \nWHERE t.id IN ("
            + ", ".join(f"${n}::INTEGER" for n in range(1, 15001))
            + ") AND t.name = $15001::VARCHAR"
        ),
        "15,000 parameters (psycopg)": (
            "SELECT t.id, t.name \nFROM t \nWHERE t.id IN ("
            + ", ".join(f"%(id_1_{n})s::INTEGER" for n in range(1, 15001))
            + ") AND t.name = %(name_1)s::VARCHAR"
        ),
        "10 MB literal IN list": ten_mb_list,
        "10 MB string literal": "SELECT '" + "x" * 10 * MIB + "'",
    }


def timed(call: Callable[[], object], budget_seconds: float, most: int) -> tuple[float, int]:
    """Median seconds of one call, over as many runs as fit the budget (at least one)."""
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < most and (not samples or time.perf_counter() - started < budget_seconds):
        begun = time.perf_counter()
        call()
        samples.append(time.perf_counter() - begun)
    return statistics.median(samples), len(samples)


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1e3:,.3f} ms" if seconds < 0.01 else f"{seconds * 1e3:,.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-old-10mb", action="store_true", help="skip the old code on 10 MB")
    args = parser.parse_args()
    try:
        import sqlparse  # noqa: F401
    except ImportError:
        sqlparse_installed = False
    else:
        sqlparse_installed = True

    print_header("Slow-query fingerprint and operation cache")
    print(f"- python {sys.version.split()[0]}; sqlparse installed: {sqlparse_installed}\n")
    print("## Fingerprint: time per statement (median)\n")
    rows = []
    for name, statement in statements().items():
        new, new_runs = timed(lambda statement=statement: _sql.fingerprint(statement), 2.0, 2000)
        shown = _sql.fingerprint(statement)
        if not sqlparse_installed or (args.no_old_10mb and "10 MB" in name):
            old_cell = "not run"
        else:
            old, old_runs = timed(lambda statement=statement: old_fingerprint(statement), 5.0, 200)
            old_cell = f"{milliseconds(old)} ({old_runs} runs)"
        shown_cell = shown if len(shown) <= 60 else shown[:57] + "..."
        rows.append([name, f"{len(statement):,}", old_cell, f"{milliseconds(new)} ({new_runs} runs)",
                     f"`{shown_cell}`"])  # fmt: skip
    print(table(["statement", "characters", "before (sqlparse)", "after", "fingerprint after"], rows,
                align="lrrrl"))  # fmt: skip

    print("\n## Operation cache after 1,500 distinct 57 KB statements, then 4,000 of 8 KB\n")
    long_ones = [f"SELECT {n} FROM t WHERE a IN ({'1, ' * 19_000}1)" for n in range(1500)]
    mid_ones = [f"DELETE FROM t WHERE id = {n} -- {'x' * 8_000}" for n in range(4000)]
    rows = []
    for label, operation_of, cache in [
        ("before", old_operation_of, old_operation_cache),
        ("after", _sql.operation_of, _sql.operation_cache),
    ]:
        cache.clear()
        cells = [label]
        for batch in (long_ones, mid_ones):
            for statement in batch:
                operation_of(statement)
            kept = sum(sys.getsizeof(statement) for statement in cache)
            cells += [f"{len(cache):,}", f"{kept / MIB:,.1f} MiB"]
        rows.append(cells)
        cache.clear()
    print(table(["code", "entries after 57 KB", "kept", "entries after 8 KB", "kept"], rows))


if __name__ == "__main__":
    main()
