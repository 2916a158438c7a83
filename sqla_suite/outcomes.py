"""pytest plugin loaded in both runs: each test's outcome, by node id, written as JSON at the end.

``SQLA_SUITE_OUTCOMES`` names the file. Outcomes: passed, failed, skipped, error (setup or teardown
raised), xfailed, xpassed. For failures and errors the exception line is kept, so the report can
say what broke without the whole traceback.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

_outcomes: dict[str, dict[str, Any]] = {}
_started = time.monotonic()


def _crash_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return f"{Path(crash.path).name}:{crash.lineno}: {crash.message}".splitlines()[0][:500]
    text = str(report.longrepr).strip().splitlines()
    return text[-1][:500] if text else ""


def _longrepr_tail(report: pytest.TestReport, lines: int = 40) -> list[str]:
    return str(report.longrepr).splitlines()[-lines:]


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _outcomes.setdefault(report.nodeid, {"outcome": "passed", "duration": 0.0})
    entry["duration"] = round(entry["duration"] + report.duration, 4)
    if report.when == "call":
        if hasattr(report, "wasxfail"):
            entry["outcome"] = "xfailed" if report.skipped else "xpassed"
        elif report.failed:
            entry["outcome"] = "failed"
        elif report.skipped:
            entry["outcome"] = "skipped"
    elif report.failed:
        entry["outcome"] = "error"  # setup or teardown raised: the worst outcome wins
    elif report.skipped and report.when == "setup":
        entry["outcome"] = "skipped"
        entry["reason"] = _crash_line(report) if report.longrepr else ""
    if report.failed:
        entry.setdefault("crash", []).append(f"{report.when}: {_crash_line(report)}")
        entry.setdefault("traceback", []).extend(_longrepr_tail(report))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    target = os.environ.get("SQLA_SUITE_OUTCOMES")
    if not target:
        return
    Path(target).write_text(
        json.dumps(
            {
                "exitstatus": int(exitstatus),
                "seconds": round(time.monotonic() - _started, 1),
                "tests": _outcomes,
            },
            indent=1,
            sort_keys=True,
        )
    )
