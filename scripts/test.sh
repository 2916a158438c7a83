#!/usr/bin/env bash
# The whole test suite, on a fresh machine: set up, lint, type-check, SQLAlchemy's suite, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
ruff check poolwatch tests demo_app benchmarks sqla_suite
ruff format --check poolwatch tests demo_app benchmarks sqla_suite
mypy  # the package and the tests (pyproject.toml)
# SQLAlchemy's own engine, pool and asyncio tests, plain and with poolwatch on every engine: any
# difference fails (README: "SQLAlchemy's own test suite"). Before pytest, whose summary ends the run.
bash scripts/sqla_suite.sh
python -m pytest -q -p no:cacheprovider "$@"
