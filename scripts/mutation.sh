#!/usr/bin/env bash
# Mutation testing of the recording path: mutmut (in the dev extra) makes small bugs, one at a time,
# in the code that counts and times checkouts, checkins and statements, and runs the fast tests
# against each. A mutant that no test kills shows where the tests are blind.
#
#   bash scripts/mutation.sh         # the working tree, uncommitted edits included
#   bash scripts/mutation.sh REF     # a commit, with the tests it had (to compare before and after)
#
# Needs the test database (see tests/conftest.py) and the dev extra (bash scripts/setup.sh test);
# PYTHON=/path/to/python picks an interpreter that has mutmut, MUTATION_CHILDREN how many mutants
# run at once (2). It works in a copy under a temporary directory, never in the checkout, prints
# the score and every mutant not killed, and leaves the copy so `mutmut show NAME` can be run there
# (its path is printed). About 10 to 15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
python="${PYTHON:-$root/.venv/bin/python}"
mutmut="$(dirname "$python")/mutmut"
ref="${1:-}"

# The modules of the hot and recording path, found by name wherever they live in the package
# (fnmatch's `*` crosses folders).
modules=(
  "poolwatch/_capture/pool_hooks.py"
  "poolwatch/_capture/dialect_hooks.py"
  "poolwatch/_record/recorder.py"
  "poolwatch/_record/histogram.py"
)
# Inside them, the functions that record: the checkout/checkin and statement hooks, the timeout,
# connect, error and pre-ping counters, the histograms and the snapshot the collector reads. (The
# leak sweep, event logging and the constructor's settings are tested elsewhere, by slower tests.)
# `?` stands for the separator mutmut puts between a class and its method.
functions=(
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
# Lines left alone: the site names of swallowed internal errors (labels of a log line), and the
# borrow-site capture, which only leak reports read (tests/test_leaks.py, too slow for this run).
skip_lines=(
  'internal_errors\.record\('
  'getframe|borrow_site|borrow_stack|is_library_code|caller'
)
# Fast tests that drive those functions through real pools on real PostgreSQL (about 15 s in all).
# Files missing at REF are left out, so an older commit is measured with the tests it had.
tests=(
  tests/test_histograms.py
  tests/test_pool_metrics.py
  tests/test_attribution.py
  tests/test_exposition.py
  tests/test_otel.py
  tests/test_logging.py
  tests/test_install.py
)
# Left out of those files: the demo command (a server of its own, slow), checks of settings and
# arguments (they never reach these functions), the check of the logging call's function name,
# which mutmut's trampolines rename, and the runs of in-process tests again under uvicorn (the
# same recording path, through a server: twice the time for no mutant more).
deselect="not demo_command and not bad_settings and not not_an_engine and not reach_stdlib_logging"
deselect+=" and not uvicorn"

work="$(mktemp -d "${TMPDIR:-/tmp}/poolwatch-mutation.XXXXXX")"
if [ -n "$ref" ]; then
  git archive "$ref" | tar -x -C "$work"
else
  git ls-files -z --cached --others --exclude-standard | tar --null -T - -c | tar -x -C "$work"
fi
cd "$work"

selected=()
for test in "${tests[@]}"; do
  if [ -f "$test" ]; then selected+=("$test"); fi
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
  echo "pytest_add_cli_args ="
  printf '    %s\n' "-p" "no:cacheprovider"
} >setup.cfg

echo "mutation: in $work, mutating ${modules[*]} against ${selected[*]}"
started=$SECONDS
if ! "$mutmut" run --max-children "${MUTATION_CHILDREN:-2}" "${functions[@]}" >mutmut-run.log 2>&1; then
  tail -c 3000 mutmut-run.log
  exit 1
fi
"$mutmut" export-cicd-stats >/dev/null
"$python" - "$((SECONDS - started))" <<'PY'
import json
import sys

stats = json.load(open("mutants/mutmut-cicd-stats.json"))
killed = stats["killed"] + stats["timeout"]
# Mutants in code that no selected test runs ("no_tests") count as not killed.
tried = killed + stats["survived"] + stats["no_tests"] + stats["suspicious"] + stats["segfault"]
print(f"mutation: {killed} of {tried} mutants killed ({100 * killed / tried:.1f}%) in {sys.argv[1]} s")
print(f"mutation: {json.dumps(stats)}")
PY
echo "mutation: not killed (\`$mutmut show NAME\` in $work shows one):"
"$mutmut" results | grep -E ": (survived|no tests|suspicious|segfault)$" || true
