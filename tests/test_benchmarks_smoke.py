"""benchmarks/instructions.py runs: its workloads, its callgrind reader, its client requests.

No timing or count is asserted against a threshold: the benchmark reports numbers, tests only
check that it can produce them. Valgrind itself is not needed here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"


@pytest.fixture(scope="module")
def instructions() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import instructions as module  # type: ignore[import-not-found]

        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_wall_clock_mode_prints_every_table(sync_url: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "instructions.py"), "--no-valgrind", "--url", sync_url,
         "--rounds", "1", "--wall-cycles", "20", "--wall-requests", "3"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for heading in ("## Pool checkout + checkin", "## Per statement", "## Per request"):
        assert heading in result.stdout
    for label in ("bare pool", "poolwatch, default settings", "floor A: count-only wrappers",
                  "dialect.do_execute, poolwatch", "request, poolwatch.instrument"):  # fmt: skip
        row = next(line for line in result.stdout.splitlines() if line.startswith(f"| {label} |"))
        assert "n/a" in row  # no counts without valgrind, but a wall-clock figure
        assert any(cell.strip().replace(".", "").isdigit() for cell in row.split("|"))


def test_child_runs_one_workload_natively(sync_url: str) -> None:
    """The process callgrind runs: here without valgrind, so nothing is counted, but it must finish."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for unit in ("default", "floor_timing", "sketch", "do_execute_pw"):
        result = subprocess.run(
            [sys.executable, str(BENCHMARKS / "instructions.py"), "--child", unit, "--n", "5",
             "--url", sync_url, "--control", "whole-run"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, f"{unit}: {result.stderr}"


def test_every_micro_operation_loop_runs(instructions: ModuleType) -> None:
    args = instructions.parse_args([])
    for name in instructions.SECTION_UNITS["op"]:
        seconds = instructions.UNITS[name].build(args)(10)
        # A float the loop measured: not a count, not None, not a constant 0 from a loop that
        # never ran (perf_counter moves over ten rounds of any workload).
        assert isinstance(seconds, float) and seconds > 0, (name, seconds)


def test_client_requests_do_nothing_outside_valgrind(instructions: ModuleType) -> None:
    control = instructions.ClientRequests()
    assert control.running_on_valgrind() is False
    control.start()
    control.stop()
    control.dump("nothing")


def test_callgrind_reader_own_and_inclusive_costs(instructions: ModuleType, tmp_path: Path) -> None:
    # The format callgrind writes (name compression, inlined files, calls), by hand.
    sample = tmp_path / "callgrind.out"
    sample.write_text(
        "version: 1\npositions: line\nevents: Ir\n\n"
        "ob=(1) /lib/libpython.so\n"
        "fl=(1) /src/Python/ceval.c\n"
        "fn=(1) _PyEval_EvalFrameDefault\n"
        "10 100\n"
        "cfl=(2) /src/Objects/dictobject.c\n"
        "cfn=(2) dict_get\n"
        "calls=3 20\n"
        "11 60\n"
        "fi=(3) /src/Include/object.h\n"
        "+1 5\n"
        "fl=(2)\n"
        "fn=(2)\n"
        "20 40\n"
        "cfn=(3) code_hash\n"
        "calls=3 30\n"
        "21 20\n"
        "fn=(3)\n"
        "30 20\n"
        "totals: 165\n"
    )
    profile = instructions.read_profile(sample)
    assert profile.self_cost == {instructions.INTERPRETER: 105, "dict_get": 40, "code_hash": 20}
    assert profile.inclusive == {"_PyEval_EvalFrameDefault": 165, "dict_get": 60, "code_hash": 20}
    assert instructions.read_total(sample) == 165


def test_live_page_benchmark_prints_its_table() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "live_page.py"), "--iterations", "3"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "3 pools x 50 routes x 100 live checkouts per pool" in result.stdout
    for label in ("| warm: read after read |", "| cold: nothing reused from the last read |"):
        row = next(line for line in result.stdout.splitlines() if line.startswith(label))
        assert float(row.split("|")[2]) > 0
