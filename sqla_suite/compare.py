"""Plain vs watched: the per-file table, the watch checks, and whether the run is a pass.

A run passes when the watched suite has the same outcome as the plain one for every test node,
poolwatch reported no internal error, every engine's ``poolwatch_checkouts_total`` equals
SQLAlchemy's own checkout events, no gauge was ever negative, poolwatch accepted every real engine,
and the harness itself raised nothing. Tests that fail the same way both ways (an environment
without prepared transactions, a driver the test was not written for) are reported, not failed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

GOOD = {"passed", "skipped", "xfailed", "xpassed"}
BAD = {"failed", "error", "missing"}
COLUMNS = ("passed", "failed", "skipped", "error")


@dataclass
class DriverResult:
    """What one driver's plain and watched runs said (reruns of differing tests included)."""

    driver: str
    plain: dict[str, dict[str, Any]]
    watched: dict[str, dict[str, Any]]
    watch_reports: list[dict[str, Any]]
    run_problems: list[str] = field(default_factory=list)
    # node id -> outcomes (plain, watched) seen on the rerun of tests that first differed
    reruns: dict[str, tuple[str, str]] = field(default_factory=dict)


def _outcome(tests: dict[str, dict[str, Any]], node: str) -> str:
    entry = tests.get(node)
    return "missing" if entry is None else str(entry["outcome"])


def _column(outcome: str) -> str:
    return {"xfailed": "skipped", "xpassed": "passed", "missing": "error"}.get(outcome, outcome)


def file_of(node: str) -> str:
    return node.split("::", 1)[0]


def differences(result: DriverResult) -> dict[str, tuple[str, str]]:
    """Node ids whose outcome differs between the first plain and watched runs."""
    nodes = set(result.plain) | set(result.watched)
    found = {}
    for node in sorted(nodes):
        plain, watched = _outcome(result.plain, node), _outcome(result.watched, node)
        if _column(plain) != _column(watched):
            found[node] = (plain, watched)
    return found


def _agreed_on_rerun(rerun: tuple[str, str] | None) -> bool:
    # A rerun that did not run the test at all ("missing") clears nothing.
    return rerun is not None and "missing" not in rerun and _column(rerun[0]) == _column(rerun[1])


def confirmed(result: DriverResult) -> dict[str, dict[str, Any]]:
    """Differences that the rerun did not clear: {node: {first, rerun, regression}}."""
    out = {}
    for node, (plain, watched) in differences(result).items():
        rerun = result.reruns.get(node)
        if _agreed_on_rerun(rerun):
            continue  # agreed when run again: a flaky test, reported separately
        out[node] = {
            "first": [plain, watched],
            "rerun": list(rerun) if rerun is not None else None,
            "regression": plain in GOOD and watched in BAD,
        }
    return out


def flaky(result: DriverResult) -> dict[str, dict[str, Any]]:
    out = {}
    for node, (plain, watched) in differences(result).items():
        rerun = result.reruns.get(node)
        if rerun is not None and _agreed_on_rerun(rerun):
            out[node] = {"first": [plain, watched], "rerun": list(rerun)}
    return out


def file_rows(result: DriverResult) -> list[dict[str, Any]]:
    files = sorted({file_of(node) for node in set(result.plain) | set(result.watched)})
    diffs = confirmed(result)
    rows = []
    for name in files:
        plain = Counter(
            _column(entry["outcome"]) for node, entry in result.plain.items() if file_of(node) == name
        )
        watched = Counter(
            _column(entry["outcome"]) for node, entry in result.watched.items() if file_of(node) == name
        )
        in_file = [node for node in diffs if file_of(node) == name]
        rows.append(
            {
                "file": name,
                "driver": result.driver,
                "plain": {column: plain.get(column, 0) for column in COLUMNS},
                "watched": {column: watched.get(column, 0) for column in COLUMNS},
                "regressions": sum(1 for node in in_file if diffs[node]["regression"]),
                "other_differences": sum(1 for node in in_file if not diffs[node]["regression"]),
            }
        )
    return rows


def watch_totals(result: DriverResult) -> dict[str, float]:
    totals: Counter[str] = Counter()
    for report in result.watch_reports:
        for key, value in report["counts"].items():
            if key == "internal_errors_total":
                totals[key] = max(totals[key], value)
            else:
                totals[key] += value
    return dict(totals)


def _watch_items(result: DriverResult, key: str) -> list[dict[str, Any]]:
    return [item for report in result.watch_reports for item in report.get(key, [])]


def summarise(results: list[DriverResult]) -> dict[str, Any]:
    drivers = []
    failures: list[str] = []
    for result in results:
        diffs = confirmed(result)
        totals = watch_totals(result)
        watch_errors = _watch_items(result, "watch_errors")
        mismatches = _watch_items(result, "mismatches")
        negative = _watch_items(result, "negative_gauges")
        harness_errors = _watch_items(result, "harness_errors")
        driver: dict[str, Any] = {
            "driver": result.driver,
            "files": file_rows(result),
            "tests_plain": len(result.plain),
            "tests_watched": len(result.watched),
            "differences": {
                node: {
                    **info,
                    "plain_crash": result.plain.get(node, {}).get("crash"),
                    "watched_crash": result.watched.get(node, {}).get("crash"),
                    "watched_traceback": result.watched.get(node, {}).get("traceback", [])[-12:],
                }
                for node, info in diffs.items()
            },
            "flaky": flaky(result),
            "same_failures_both_ways": sorted(
                node
                for node in result.plain
                if _outcome(result.plain, node) in BAD and _outcome(result.watched, node) in BAD
            ),
            "watch": totals,
            "mismatches": mismatches,
            "negative_gauges": negative,
            "watch_errors": watch_errors,
            "not_watchable": _watch_items(result, "not_watchable"),
            "internal_errors": _watch_items(result, "internal_errors"),
            "harness_errors": harness_errors,
            "notes": sorted(set(_watch_items(result, "notes"))),
            "run_problems": result.run_problems,
        }
        drivers.append(driver)
        name = result.driver
        regressions = sum(1 for info in diffs.values() if info["regression"])
        if regressions:
            failures.append(f"{name}: {regressions} regression(s)")
        if len(diffs) - regressions:
            failures.append(f"{name}: {len(diffs) - regressions} other outcome difference(s)")
        if totals.get("internal_errors_total", 0) or totals.get("internal_errors_seen", 0):
            failures.append(f"{name}: poolwatch internal errors {totals.get('internal_errors_total', 0):g}")
        if mismatches:
            failures.append(f"{name}: {len(mismatches)} engine(s) with a checkout-count mismatch")
        if negative:
            failures.append(f"{name}: {len(negative)} engine(s) with a negative gauge")
        if watch_errors:
            failures.append(f"{name}: poolwatch.watch() raised for {len(watch_errors)} engine(s)")
        if harness_errors:
            failures.append(f"{name}: {len(harness_errors)} harness error(s)")
        failures.extend(f"{name}: {problem}" for problem in result.run_problems)
    return {"ok": not failures, "failures": failures, "drivers": drivers}


def _cells(counts: dict[str, int]) -> str:
    return " / ".join(str(counts[column]) for column in COLUMNS)


def markdown(summary: dict[str, Any], *, header: str = "") -> str:
    lines = [header] if header else []
    lines += [
        "| file | driver | plain: passed / failed / skipped / errors "
        "| watched: passed / failed / skipped / errors | regressions |",
        "|---|---|---|---|---|",
    ]
    plain_counts: Counter[str] = Counter()
    watched_counts: Counter[str] = Counter()
    regressions = 0
    for driver in summary["drivers"]:
        for row in driver["files"]:
            lines.append(
                f"| {row['file']} | {row['driver']} | {_cells(row['plain'])} | "
                f"{_cells(row['watched'])} | {row['regressions']} |"
            )
            plain_counts.update(row["plain"])
            watched_counts.update(row["watched"])
            regressions += row["regressions"]
    plain_total = {column: plain_counts.get(column, 0) for column in COLUMNS}
    watched_total = {column: watched_counts.get(column, 0) for column in COLUMNS}
    lines.append(f"| **all** | | {_cells(plain_total)} | {_cells(watched_total)} | {regressions} |")
    lines += [
        "",
        "| driver | engines | watched | not watchable | watch() raised | checkouts compared "
        "| count mismatches | negative gauges | internal errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for driver in summary["drivers"]:
        watch = driver["watch"]
        lines.append(
            f"| {driver['driver']} | {watch.get('engines', 0):g} | {watch.get('watched', 0):g} | "
            f"{watch.get('not_watchable', 0):g} | {watch.get('watch_errors', 0):g} | "
            f"{watch.get('checkouts_compared', 0):g} | {watch.get('checkout_mismatches', 0):g} | "
            f"{watch.get('negative_gauge_engines', 0):g} | {watch.get('internal_errors_total', 0):g} |"
        )
    details = _details(summary)
    if details:
        lines += ["", *details]
    lines += ["", "Result: " + ("PASS" if summary["ok"] else "FAIL: " + "; ".join(summary["failures"]))]
    return "\n".join(lines) + "\n"


def _details(summary: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for driver in summary["drivers"]:
        name = driver["driver"]
        for node, info in driver["differences"].items():
            kind = "regression" if info["regression"] else "difference"
            rerun = f", rerun {info['rerun'][0]} / {info['rerun'][1]}" if info["rerun"] else ""
            first = f"plain {info['first'][0]}, watched {info['first'][1]}"
            lines.append(f"- {kind} [{name}] `{node}`: {first}{rerun}")
            for crash in info["watched_crash"] or []:
                lines.append(f"  - watched: {crash}")
        for node, info in driver["flaky"].items():
            lines.append(
                f"- flaky [{name}] `{node}`: first plain {info['first'][0]} / watched {info['first'][1]}, "
                f"agreed on rerun ({info['rerun'][0]} / {info['rerun'][1]})"
            )
        for record in driver["watch_errors"]:
            lines.append(
                f"- poolwatch.watch() raised [{name}] in `{record['made_in']}` "
                f"({record['origin']}): {record['watch_error'] or record['listen_error']}"
            )
        for record in driver["mismatches"]:
            lines.append(
                f"- checkout mismatch [{name}] {record['name']} made in `{record['made_in']}`: "
                f"poolwatch {record['poolwatch_checkouts']}, SQLAlchemy {record['sqlalchemy_checkouts']} "
                f"(first seen {record['mismatch_first_seen']})"
            )
        for record in driver["negative_gauges"]:
            lines.append(f"- negative gauge [{name}] {record['name']}: {record['negative_gauges'][:3]}")
        for error in driver["internal_errors"]:
            lines.append(
                f"- internal error [{name}] site {error['site']} in `{error['test']}`: {error['error']}"
            )
        for error in driver["harness_errors"]:
            lines.append(f"- harness error [{name}]: {error.splitlines()[0]}")
        for record in driver["not_watchable"]:
            lines.append(
                f"- not watchable (not a real engine) [{name}] in `{record['made_in']}`: "
                f"{record['not_watchable']}"
            )
        for note in driver["notes"]:
            lines.append(f"- note [{name}]: {note}")
        for node in driver["same_failures_both_ways"]:
            lines.append(f"- fails both ways [{name}] `{node}`")
        for problem in driver["run_problems"]:
            lines.append(f"- run problem [{name}]: {problem}")
    return lines
