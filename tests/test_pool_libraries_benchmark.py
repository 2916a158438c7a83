"""benchmarks/pool_libraries.py runs: each paired cycle yields positive times and a ratio.

No time or ratio is asserted against a threshold: the benchmark reports numbers.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_pool_libraries_benchmark_prints_its_table(postgres_url: str) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "pool_libraries.py"), "--url", postgres_url,
         "--rounds", "2", "--cycles", "20"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert [row[0] for row in rows] == ["asyncpg", "psycopg_pool", "psycopg_pool"]
    for row in rows:
        bare, watched, ratio = float(row[-3]), float(row[-2]), float(row[-1].rstrip("x"))
        assert bare > 0 and watched > 0 and ratio > 0


def test_the_instruction_counts_come_per_cycle(postgres_url: str) -> None:
    # Not skipped without valgrind: the instruction benchmark is the one whose ratios are stable
    # here, so a machine that cannot run it fails this test and says why.
    assert shutil.which("valgrind") is not None, "valgrind is needed (Debian package valgrind)"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "pool_libraries.py"), "--url", postgres_url,
         "--instructions", "--only", "psycopg_sync", "--n1", "20", "--n2", "60"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (row,) = [line.split() for line in result.stdout.splitlines()[1:]]
    bare, watched = float(row[-3]), float(row[-2])
    # poolwatch's hooks run on every cycle: the watched cycle executes more instructions.
    assert 0 < bare < watched
