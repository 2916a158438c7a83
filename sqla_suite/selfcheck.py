"""Before trusting a green comparison: show that each of its checks can go red.

Runs ``selfcheck_cases`` under the watch plugin (SQLite, seconds) and checks the plugin reported
exactly what the cases provoke, then feeds ``compare`` outcomes with a regression, a flaky test
and a test missing from its rerun. Returns the problems found; none means the yardstick works.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import compare

CASES = "sqla_suite/selfcheck_cases.py"


def _made_in(report: dict[str, Any], case: str, key: str = "engines") -> list[dict[str, Any]]:
    return [record for record in report[key] if record["made_in"].endswith(f"::{case}")]


def check_plugin(repo: Path) -> list[str]:
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        report_file = Path(scratch) / "watch.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
        env["SQLA_SUITE_WATCH_REPORT"] = str(report_file)
        env.pop("SQLA_SUITE_POOLWATCH", None)
        command = [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "-p", "sqla_suite.poolwatch_everywhere", CASES,
        ]  # fmt: skip
        finished = subprocess.run(  # noqa: S603 - this interpreter, fixed arguments
            command, cwd=repo, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        if finished.returncode != 0 or not report_file.is_file():
            return [f"self-check cases did not pass (exit {finished.returncode}):\n{finished.stdout[-3000:]}"]
        report = json.loads(report_file.read_text())

    def expect(condition: bool, what: str) -> None:
        if not condition:
            problems.append(what)

    mismatched = {record["made_in"].rsplit("::", 1)[-1] for record in report["mismatches"]}
    negative = {record["made_in"].rsplit("::", 1)[-1] for record in report["negative_gauges"]}
    refused = {record["made_in"].rsplit("::", 1)[-1] for record in report["watch_errors"]}
    expect(mismatched == {"test_miscount"}, f"checkout mismatches should be test_miscount only: {mismatched}")
    expect(negative == {"test_negative_gauge"}, f"negative gauges should be test_negative_gauge: {negative}")
    expect(refused == {"test_watch_refused"}, f"watch errors should be test_watch_refused only: {refused}")
    sites = {error["site"] for error in report["internal_errors"]}
    expect(sites == {"selfcheck"}, f"internal errors should be the provoked one only: {sites}")
    expect(report["counts"]["internal_errors_total"] >= 1, "internal_errors_total not read from a scrape")
    clean = _made_in(report, "test_clean_engine")
    expect(
        len(clean) == 1 and clean[0]["poolwatch_checkouts"] == clean[0]["sqlalchemy_checkouts"] == 3,
        f"the clean engine should show 3 checkouts on both sides: {clean}",
    )
    retried = _made_in(report, "test_retried_checkout")
    expect(
        len(retried) == 1 and retried[0]["poolwatch_checkouts"] == retried[0]["sqlalchemy_checkouts"] == 1,
        f"a retried checkout should count once on both sides: {retried}",
    )
    miscount = _made_in(report, "test_miscount")
    expect(
        len(miscount) == 1
        and (miscount[0]["poolwatch_checkouts"], miscount[0]["sqlalchemy_checkouts"]) == (1, 2),
        f"the miscount case should be poolwatch 1, SQLAlchemy 2: {miscount}",
    )
    unseen = [error for error in report["harness_errors"] if "no wrapper saw" in error]
    expect(len(unseen) == 1, f"the engine made behind the wrappers' backs should be reported: {unseen}")
    others = [error for error in report["harness_errors"] if "no wrapper saw" not in error]
    expect(not others, f"harness errors: {others}")
    return problems


def check_compare() -> list[str]:
    problems: list[str] = []
    plain = {
        "t.py::a": {"outcome": "passed"},
        "t.py::b": {"outcome": "passed"},
        "t.py::c": {"outcome": "failed"},
        "t.py::d": {"outcome": "passed"},
        "t.py::e": {"outcome": "passed"},
    }
    watched = {
        "t.py::a": {"outcome": "failed"},  # regression, confirmed by the rerun
        "t.py::b": {"outcome": "error"},  # differs once, agrees on rerun: flaky
        "t.py::c": {"outcome": "failed"},  # fails both ways: fine
        "t.py::d": {"outcome": "passed"},
        "t.py::e": {"outcome": "failed"},  # the rerun did not run it: stays a regression
    }
    result = compare.DriverResult("selfcheck", plain, watched, watch_reports=[])
    result.reruns = {
        "t.py::a": ("passed", "failed"),
        "t.py::b": ("passed", "passed"),
        "t.py::e": ("missing", "missing"),
    }
    summary = compare.summarise([result])
    found = set(summary["drivers"][0]["differences"])
    if summary["ok"] or found != {"t.py::a", "t.py::e"}:
        problems.append(f"compare should flag t.py::a and t.py::e only, flagged {found}")
    if set(summary["drivers"][0]["flaky"]) != {"t.py::b"}:
        problems.append("compare should call t.py::b flaky")
    clean = compare.summarise([compare.DriverResult("selfcheck", plain, dict(plain), watch_reports=[])])
    if not clean["ok"]:
        problems.append(f"identical outcomes should pass: {clean['failures']}")
    return problems


def run(repo: Path) -> list[str]:
    return check_compare() + check_plugin(repo)
