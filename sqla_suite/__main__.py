"""python -m sqla_suite: SQLAlchemy's own suite, plain and with poolwatch on every engine, compared.

Run from the repository root with the repository on PYTHONPATH (scripts/sqla_suite.sh does both).
Exit status 0 only when the comparison passes (see ``compare``); 2 when the harness could not run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import compare, database, sdist, selfcheck

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / ".cache" / "sqla"
DEFAULT_SERVER = "127.0.0.1:5432"

ENGINE_FILES = (
    "test/engine/test_pool.py",
    "test/engine/test_reconnect.py",
    "test/engine/test_execute.py",
    "test/engine/test_transaction.py",
)
FILES_BY_DRIVER = {
    "psycopg": ENGINE_FILES,
    "asyncpg": (*ENGINE_FILES, "test/ext/asyncio/test_engine.py"),
}
MODES = ("plain", "watched")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sqla_suite", description=__doc__)
    parser.add_argument(
        "--server",
        default=os.environ.get("SQLA_SUITE_SERVER", DEFAULT_SERVER),
        help="PostgreSQL host:port, user postgres (trust auth) [%(default)s]",
    )
    parser.add_argument("--database", default="sqla_suite", help="database of its own [%(default)s]")
    parser.add_argument("--drivers", default="psycopg,asyncpg", help="comma-separated [%(default)s]")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="sdist cache [%(default)s]")
    parser.add_argument("--out", type=Path, default=None, help="results directory [CACHE/results]")
    parser.add_argument(
        "--timeout", type=int, default=900, help="seconds one pytest run may take [%(default)s]"
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="second run with the harness but no poolwatch.watch(): the harness alone changes nothing",
    )
    parser.add_argument("--no-rerun", action="store_true", help="do not rerun tests whose outcomes differ")
    parser.add_argument(
        "--pytest-args", default="", help="extra pytest arguments, e.g. '-k pool' (space-separated)"
    )
    return parser.parse_args()


def _url(server: str, database_name: str, driver: str) -> str:
    return f"postgresql+{driver}://postgres@{server}/{database_name}"


def _run_pytest(
    suite: Path,
    url: str,
    mode: str,
    targets: list[str],
    out: Path,
    tag: str,
    timeout: int,
    extra: list[str],
    control: bool = False,
) -> tuple[dict[str, Any], dict[str, Any] | None, list[str]]:
    """One pytest run of the suite; returns (outcomes, watch report or None, problems)."""
    outcomes_file = out / f"{tag}.outcomes.json"
    report_file = out / f"{tag}.watch.json"
    log_file = out / f"{tag}.log"
    for stale in (outcomes_file, report_file):
        stale.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["SQLA_SUITE_OUTCOMES"] = str(outcomes_file)
    env["SQLA_SUITE_WATCH_REPORT"] = str(report_file)
    env["SQLA_SUITE_POOLWATCH"] = "off" if control else "on"
    command = [
        sys.executable, "-m", "pytest",
        "-p", "sqla_suite.outcomes",
        "-p", "no:cacheprovider",
        "--maxfail=1000000",  # the suite's own addopts stop at 250 failures
        "--dropfirst",  # our own database: clear whatever an interrupted run left
        f"--dburi={url}",
    ]  # fmt: skip
    if mode == "watched":
        command[3:3] = ["-p", "sqla_suite.poolwatch_everywhere"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        command.append("--timeout=300")  # one hung test must not hang the run
    command += extra + targets
    problems = []
    started = time.monotonic()
    with log_file.open("w") as log:
        log.write(" ".join(command) + "\n\n")
        log.flush()
        try:
            # The command is ours: this interpreter, pytest and the suite's own files.
            finished = subprocess.run(  # noqa: S603
                command, cwd=suite, env=env, stdout=log, stderr=subprocess.STDOUT,
                timeout=timeout, check=False,
            )  # fmt: skip
            status: int | str = finished.returncode
        except subprocess.TimeoutExpired:
            status = "timeout"
            problems.append(f"{tag}: pytest did not finish within {timeout} s (log {log_file})")
    elapsed = time.monotonic() - started
    if status not in (0, 1, "timeout"):
        problems.append(f"{tag}: pytest exit status {status} (log {log_file})")
    outcomes: dict[str, Any] = {}
    if outcomes_file.is_file():
        outcomes = json.loads(outcomes_file.read_text())["tests"]
    elif status != "timeout":
        problems.append(f"{tag}: no outcomes written (log {log_file})")
    report = None
    if mode == "watched":
        if report_file.is_file():
            report = json.loads(report_file.read_text())
        else:
            problems.append(f"{tag}: the watch plugin wrote no report (log {log_file})")
    print(f"  {tag}: {len(outcomes)} tests, exit {status}, {elapsed:.0f} s", flush=True)
    return outcomes, report, problems


def main() -> int:
    args = _arguments()
    started = time.monotonic()
    cache: Path = args.cache.resolve()
    out: Path = (args.out or cache / "results").resolve()
    out.mkdir(parents=True, exist_ok=True)
    drivers = [driver.strip() for driver in args.drivers.split(",") if driver.strip()]
    unknown = [driver for driver in drivers if driver not in FILES_BY_DRIVER]
    if unknown:
        print(f"sqla_suite: unknown driver(s) {unknown}; known: {sorted(FILES_BY_DRIVER)}", file=sys.stderr)
        return 2
    extra = args.pytest_args.split()

    problems = selfcheck.run(REPO)
    if problems:
        print("sqla_suite: the self-check failed, so a green result would mean nothing:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    print("self-check: every watch check and the comparison can fail (sqla_suite/selfcheck_cases.py)")

    try:
        version, suite = sdist.suite_root(cache)
    except Exception as error:
        print(f"sqla_suite: could not get SQLAlchemy's test suite: {error}", file=sys.stderr)
        return 2
    print(f"SQLAlchemy {version}: suite in {suite}", flush=True)
    admin_url = _url(args.server, args.database, "psycopg")
    try:
        for step in database.prepare(admin_url):
            print(f"  {step}")
    except Exception as error:
        print(
            f"sqla_suite: could not prepare database {args.database} on {args.server} "
            f"(PostgreSQL, user postgres, trust auth): {error}",
            file=sys.stderr,
        )
        return 2

    results = []
    for driver in drivers:
        url = _url(args.server, args.database, driver)
        targets = list(FILES_BY_DRIVER[driver])
        runs: dict[str, tuple[dict[str, Any], dict[str, Any] | None, list[str]]] = {}
        for mode in MODES:
            runs[mode] = _run_pytest(
                suite, url, mode, targets, out, f"{driver}.{mode}", args.timeout, extra, args.control
            )
        result = compare.DriverResult(
            driver=driver,
            plain=runs["plain"][0],
            watched=runs["watched"][0],
            watch_reports=[report for report in (runs["watched"][1],) if report is not None],
            run_problems=runs["plain"][2] + runs["watched"][2],
        )
        differing = sorted(compare.differences(result))
        if differing and not args.no_rerun:
            print(f"  {driver}: {len(differing)} test(s) differ; running them again both ways", flush=True)
            again = {
                mode: _run_pytest(
                    suite,
                    url,
                    mode,
                    differing,
                    out,
                    f"{driver}.{mode}.rerun",
                    args.timeout,
                    extra,
                    args.control,
                )
                for mode in MODES
            }
            for node in differing:
                result.reruns[node] = (
                    again["plain"][0].get(node, {}).get("outcome", "missing"),
                    again["watched"][0].get(node, {}).get("outcome", "missing"),
                )
            if again["watched"][1] is not None:
                result.watch_reports.append(again["watched"][1])
            result.run_problems += again["plain"][2] + again["watched"][2]
        results.append(result)

    summary = compare.summarise(results)
    summary["sqlalchemy_version"] = version
    summary["seconds"] = round(time.monotonic() - started, 1)
    second = "the harness without poolwatch (control)" if args.control else "poolwatch on every engine"
    summary["control"] = args.control
    header = (
        f"SQLAlchemy {version} suite against PostgreSQL, plain vs {second} ({summary['seconds']:.0f} s)\n"
    )
    text = compare.markdown(summary, header=header)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    (out / "summary.md").write_text(text)
    print()
    print(text)
    print(f"details: {out / 'summary.md'}, {out / 'summary.json'}, logs in {out}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
