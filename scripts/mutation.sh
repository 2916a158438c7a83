#!/usr/bin/env bash
# Mutation testing: mutmut (in the dev extra) makes small bugs, one at a time, in the code that
# records, serves and guards, and runs the tests that cover each module against each. A mutant that
# no test kills shows where the tests are blind. A separate command, not part of scripts/test.sh:
# a full run takes hours on 2 cores.
#
#   bash scripts/mutation.sh                    # every group, the working tree (uncommitted edits too)
#   bash scripts/mutation.sh --only serve       # one group (repeat --only for several): record,
#                                               #   serve, edge (_guard, pytest_plugin, _settings)
#   bash scripts/mutation.sh --only record REF  # a commit, with the tests it had (before and after)
#   MUTATION_FUNCTIONS="poolwatch._serve.health.*" MUTATION_TESTS="tests/test_health_verdicts.py" \
#     bash scripts/mutation.sh --only serve     # one module against the tests named
#
# Needs the test database (see tests/conftest.py) and the dev extra (bash scripts/setup.sh test);
# PYTHON=/path/to/python picks an interpreter that has mutmut, MUTATION_CHILDREN how many mutants
# run at once (2). It works in a copy under a temporary directory, never in the checkout, prints
# the score (overall and per package folder) and every mutant not killed, and leaves the copy so
# `mutmut show NAME` can be run there (its path is printed). The record group (836 mutants) takes
# about 50 minutes on 2 cores, edge (810) about 30, serve (about 5,100) several hours.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
python="${PYTHON:-$root/.venv/bin/python}"
mutmut="$(dirname "$python")/mutmut"
groups=()
ref=""
while [ $# -gt 0 ]; do
  case "$1" in
    --only) groups+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) ref="$1"; shift ;;
  esac
done
if [ ${#groups[@]} -eq 0 ]; then groups=(record serve edge); fi

modules=()
functions=()
tests=()
for group in "${groups[@]}"; do
  case "$group" in
    record)
      # The hot and recording path, found by name wherever it lives in the package (fnmatch's `*`
      # crosses folders).
      modules+=(
        "poolwatch/_capture/pool_hooks.py"
        "poolwatch/_capture/dialect_hooks.py"
        "poolwatch/_record/recorder.py"
        "poolwatch/_record/histogram.py"
      )
      # Inside them, the functions that record: the checkout/checkin and statement hooks, the
      # timeout, connect, error and pre-ping counters, the histograms and the snapshot the collector
      # reads. (The leak sweep, event logging and the constructor's settings are tested elsewhere,
      # by slower tests.) `?` stands for the separator mutmut puts between a class and its method.
      functions+=(
        "*.x_hook_pool__mutmut_*" "*.x__failed_wait__mutmut_*"
        "*.x_hook_dialect__mutmut_*" "*.x?_StatementTimer?__init____mutmut_*"
        "*.x__query_failed__mutmut_*" "*.x__pre_ping_failed__mutmut_*"
        "*.x?PoolRecorder?wait_failed__mutmut_*" "*.x?PoolRecorder?connected__mutmut_*"
        "*.x?PoolRecorder?disconnected__mutmut_*" "*.x?PoolRecorder?invalidated__mutmut_*"
        "*.x?PoolRecorder?pre_ping_failed__mutmut_*" "*.x?PoolRecorder?query_failed__mutmut_*"
        "*.x?PoolRecorder?count_after_response__mutmut_*" "*.x?PoolRecorder?use_histogram__mutmut_*"
        "*.x?PoolRecorder?snapshot__mutmut_*" "*.x_copy_counts__mutmut_*" "*.x_copy_histograms__mutmut_*"
        "*.x_bump__mutmut_*" "*.x_ticker_value__mutmut_*"
        "*.x?Histogram?*" "*.x?HistogramCopy?*"
      )
      # Fast tests that drive those functions through real pools on real PostgreSQL. Not
      # tests/test_gc_reentry.py: its collections forced at every allocation re-enter mutmut's
      # own bookkeeping (a set it adds to on every call) and crash the interpreter (a segfault in
      # mutmut 3.8.1's trampoline); tests/record/test_copies.py puts a nested write exactly
      # between the copies the reading paths take instead.
      tests+=(
        tests/test_histograms.py tests/test_pool_metrics.py tests/test_attribution.py
        tests/test_exposition.py tests/test_otel.py tests/test_logging.py tests/test_install.py
        tests/test_held_idle_and_failures.py tests/test_held_idle_database_time.py
        tests/record/test_copies.py tests/record/test_failed_statements.py
        tests/record/test_failed_statement_usage.py tests/test_acquires_and_closings.py
        tests/record/test_dialect_counts.py tests/record/test_statement_timer.py
        tests/record/test_checkout_edges.py
        tests/test_idle_in_transaction.py tests/test_response_holds.py tests/test_pool_counts.py
      )
      ;;
    serve)
      # Everything that answers: HTTP, health, the live page, workers, causes, the server's limit.
      modules+=("poolwatch/_serve/*.py" "poolwatch/_capture/capacity/*.py")
      functions+=("poolwatch._serve.*" "poolwatch._capture.capacity.*")
      # Not here: tests/test_workers.py, tests/test_multiworker.py and tests/test_threadpool_
      # starvation.py start servers as processes of their own (gunicorn, uvicorn, fastapi run),
      # which import the mutated package from another working directory, where its trampolines
      # find no mutmut settings and the server fails to boot; the sidecar's worker process is
      # left out below for the same reason. tests/serve/test_multiprocess_merge.py covers the
      # merging of workers' files in process.
      tests+=(
        tests/serve tests/test_health.py tests/test_health_verdicts.py tests/test_probe_stalls.py
        tests/test_probe_pools.py tests/test_exposition.py tests/test_live_page.py
        tests/test_sidecar.py tests/test_threadpool.py tests/test_capacity.py
        tests/test_server_limit.py tests/test_app_middleware_route.py tests/test_pool_metrics.py
        tests/test_attribution.py tests/capture/test_capacity_limits.py
        tests/capture/test_capacity_reads.py tests/test_driver_pool_absent.py
      )
      ;;
    edge)
      # The integrations at the edge: the test guard, its pytest plugin, the settings.
      modules+=("poolwatch/_guard.py" "poolwatch/pytest_plugin.py" "poolwatch/_settings.py")
      functions+=("poolwatch._guard.*" "poolwatch.pytest_plugin.*" "poolwatch._settings.*")
      tests+=(
        tests/test_guard.py tests/test_guard_checkouts.py tests/test_pytest_plugin.py
        tests/test_guard_in_process.py tests/test_pytest_plugin_in_process.py
        tests/test_guard_mutants.py tests/test_guard_driver_pools.py
        tests/test_settings.py tests/test_settings_documented.py tests/test_settings_refusals.py
      )
      ;;
    *) echo "mutation: unknown group '$group' (record, serve, edge)" >&2; exit 2 ;;
  esac
done
# Narrower runs, for a slow machine or one module's survivors: MUTATION_FUNCTIONS="pattern ..."
# (mutmut names, e.g. "poolwatch._serve.health.*") and MUTATION_TESTS="file ..." replace the
# group's functions and tests; the score then counts only the mutants run.
if [ -n "${MUTATION_FUNCTIONS:-}" ]; then read -r -a functions <<<"$MUTATION_FUNCTIONS"; fi
if [ -n "${MUTATION_TESTS:-}" ]; then read -r -a tests <<<"$MUTATION_TESTS"; fi
# Lines left alone: the site names of swallowed internal errors (labels of a log line), and the
# borrow-site capture, which only leak reports read (tests/test_leaks.py, too slow for this run).
skip_lines=(
  'internal_errors\.record\('
  'getframe|borrow_site|borrow_stack|is_library_code|caller'
)
# Left out of those files: the demo command (a server of its own, slow), checks of settings and
# arguments in the record group's files (they never reach its functions; the edge group runs the
# settings tests), the check of the logging call's function name, which mutmut's trampolines
# rename, the runs of in-process tests again under uvicorn (the same code through a server: twice
# the time for no mutant more; so a test run in process must not have "uvicorn" in its name), and
# the browser.
deselect="not demo_command and not not_an_engine and not reach_stdlib_logging and not uvicorn"
deselect+=" and not an_async_worker_is_never_disturbed_by_the_sidecar"
case " ${groups[*]} " in
  *" edge "*) ;;
  *) deselect+=" and not bad_settings" ;;
esac
# A caller held in a connect until its 30 s timeout: 30 s for every mutant of the pool hooks it
# covers; test_callers_pre_pinging_are_not_pending checks the same counting in under a second.
case " ${groups[*]} " in
  *" record "*) deselect+=" and not callers_opening_a_connection_are_not_pending" ;;
esac
# MUTATION_DESELECT="expr" leaves out more (pytest -k), e.g. tests that fail in the tree today:
# mutmut refuses to start when a selected test fails without a mutant.
if [ -n "${MUTATION_DESELECT:-}" ]; then deselect+=" and not ($MUTATION_DESELECT)"; fi

work="$(mktemp -d "${TMPDIR:-/tmp}/poolwatch-mutation.XXXXXX")"
if [ -n "$ref" ]; then
  git archive "$ref" | tar -x -C "$work"
else
  git ls-files -z --cached --others --exclude-standard | tar --null -T - -c | tar -x -C "$work"
fi
cd "$work"
# In the copy only: the borrow site skips mutmut's trampolines as it skips poolwatch's own frames,
# so the tests that check the site a leak report names (the guard's) run under mutmut too.
sed -i 's/^_SKIPPED_PACKAGES = ("poolwatch",/_SKIPPED_PACKAGES = ("mutmut", "poolwatch",/' \
  poolwatch/_capture/borrow_site.py
grep -q '^_SKIPPED_PACKAGES = ("mutmut",' poolwatch/_capture/borrow_site.py || {
  echo "mutation: could not teach poolwatch/_capture/borrow_site.py to skip mutmut's frames" >&2
  exit 1
}

selected=()
for test in "${tests[@]}"; do
  case " ${selected[*]-} " in *" $test "*) continue ;; esac
  if [ -e "$test" ]; then selected+=("$test"); fi
done
{
  echo "[mutmut]"
  echo "source_paths = poolwatch"
  echo "only_mutate ="
  printf '    %s\n' "${modules[@]}"
  echo "do_not_mutate_patterns ="
  printf '    %s\n' "${skip_lines[@]}"
  echo "pytest_add_cli_args_test_selection ="
  printf '    %s\n' "${selected[@]}" "-k" "$deselect"
  # Files the tests read beside the package and the tests (the settings table, the dashboards).
  echo "also_copy ="
  for extra in README.md pyproject.toml docs dashboards scripts demo_app benchmarks; do
    if [ -e "$extra" ]; then printf '    %s\n' "$extra"; fi
  done
  echo "pytest_add_cli_args ="
  printf '    %s\n' "-p" "no:cacheprovider"
} >setup.cfg

# Tests that start Python processes of their own (pytester's subprocess runs, gunicorn, uvicorn, the
# starvation app) import poolwatch from the editable install, unmutated: what only they check
# survives here, and code only they run shows as "no tests". (PYTHONPATH=mutants makes mutmut
# 3.8.1 find no test for any mutant.)
echo "mutation: in $work, mutating ${modules[*]} against ${selected[*]}"
started=$SECONDS
if ! "$mutmut" run --max-children "${MUTATION_CHILDREN:-2}" "${functions[@]}" >mutmut-run.log 2>&1; then
  tail -c 3000 mutmut-run.log
  exit 1
fi
"$python" - "$((SECONDS - started))" <<'PY'
import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

# The score per package folder (poolwatch/_capture/capacity counts in poolwatch/_serve here), read from
# the result files mutmut writes beside each mutated module. Mutants no selected test runs
# ("no tests") count as not killed; mutants not in the run's functions are not counted.
by_folder: dict[str, Counter[str]] = {}
for meta in sorted(Path("mutants").rglob("*.py.meta")):
    folder = "/".join(meta.relative_to("mutants").parts[:2])
    if folder.endswith(".py.meta"):
        folder = "poolwatch (top level)"
    for exit_code in json.loads(meta.read_text())["exit_code_by_key"].values():
        if exit_code is None:
            continue
        status = status_by_exit_code[exit_code]
        by_folder.setdefault(folder, Counter())[status] += 1


def line(name: str, counts: Counter[str]) -> str:
    killed = counts["killed"] + counts["timeout"] + counts["caught by type check"]
    tried = killed + counts["survived"] + counts["no tests"] + counts["suspicious"] + counts["segfault"]
    share = 100 * killed / tried if tried else 0.0
    return f"mutation: {name}: {killed} of {tried} mutants killed ({share:.1f}%)"


total: Counter[str] = Counter()
for folder, counts in by_folder.items():
    total.update(counts)
    print(line(folder, counts))
print(line("all", total) + f" in {sys.argv[1]} s")
print(f"mutation: {json.dumps(dict(total))}")
PY
echo "mutation: not killed (\`$mutmut show NAME\` in $work shows one):"
"$mutmut" results | grep -E ": (survived|no tests|suspicious|segfault)$" || true
